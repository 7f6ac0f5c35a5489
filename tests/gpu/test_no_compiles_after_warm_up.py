"""After the start-up warm-up, serving traffic compiles no Triton kernel: a lone request, then requests
of many lengths arriving while it decodes (mixed steps, chunked MoE layouts, other split counts, prompts
longer than a step), and a prefix-cache hit; bf16 and quantized models. Each case runs in a fresh process with an empty Triton cache, so that every compile
of the run leaves a file there; a kernel compiled mid-serving stalls every request for seconds."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TRAFFIC = """
import glob, json, os, random, sys
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

def compiled():
    return {os.path.basename(p)[:-5] for p in glob.glob(os.environ["TRITON_CACHE_DIR"] + "/*/*.json")
            if not os.path.basename(p).startswith("__grp__")}

llm = LLM(sys.argv[1], device="cuda", dtype="bfloat16", max_model_len=4096, max_num_batched_tokens=2048,
          quantization=sys.argv[2] or None)
engine, rng = llm.engine, random.Random(0)
after_warm_up = compiled()
params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
first = [rng.randrange(5, 200) for _ in range(256)]
engine.add_request({"prompt_token_ids": first}, params)
engine.step()
for n in [1, 2, 15, 16, 17, 33, 64, 100, 127, 129, 255, 300, 511, 700, 1500, 2047, 3000]:
    engine.add_request({"prompt_token_ids": [rng.randrange(5, 200) for _ in range(n)]}, params)
engine.add_request({"prompt_token_ids": first + [7, 8, 9]}, params)  # a prefix-cache hit
while engine.has_unfinished_requests():
    engine.step()
print(json.dumps({"after_warm_up": len(after_warm_up), "new": sorted(compiled() - after_warm_up)}))
"""


@pytest.mark.parametrize("preset,quantization", [("tiny-deepseek-v2-lite", ""), ("tiny-qwen3-moe", ""),
                                                 ("tiny-deepseek-v3", "fp8"), ("tiny-qwen3-moe", "nvfp4")])
def test_serving_traffic_compiles_nothing_after_the_warm_up(preset, quantization, tmp_path):
    env = os.environ | {"TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", TRAFFIC, preset, quantization], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["after_warm_up"] > 0  # the warm-up's compiles landed in this cache
    assert result["new"] == []
