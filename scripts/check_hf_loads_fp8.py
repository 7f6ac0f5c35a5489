"""Informational: does transformers load moeserve's FP8 export (DeepSeek layout) and agree with it?
Run on a CUDA machine: PYTHONPATH=. python3 scripts/check_hf_loads_fp8.py"""

import tempfile
from pathlib import Path

import torch
import transformers

import moeserve
from moeserve.cli import main

folder = Path(tempfile.mkdtemp()) / "fp8"
main(["quantize", "tiny-qwen3-moe", str(folder), "--format", "fp8"])
ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
ours = moeserve.load_model(folder, device="cuda", progress=False)(ids.cuda()).float()
try:
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", dtype=torch.float32)
    theirs = reference(ids.cuda()).logits.float()
    log_p, log_q = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"transformers {transformers.__version__} loaded the FP8 export: KL(ours || theirs) {kl:.5f}, "
          f"top-1 agreement {top1:.3f} (theirs quantizes activations to FP8, ours does not)")
except Exception as error:  # informational: report what happened
    print(f"transformers {transformers.__version__} could not load the FP8 export: {type(error).__name__}: {error}")
