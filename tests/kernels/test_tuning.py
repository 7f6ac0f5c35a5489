"""The tuned block-size table: what the sweep may pick and how a shape finds its entry."""

from dataclasses import asdict

from moeserve.kernels.moe_gemm import FP8_BLOCK, GemmConfig
from moeserve.kernels.tuning import candidates, default_config, lookup


def test_candidates_fit_every_format():
    for rows in (8, 1024, 4096):
        configs = list(candidates(rows))
        assert configs and len(set(configs)) == len(configs)
        assert all(FP8_BLOCK % c.block_k == 0 and c.block_k % 32 == 0 for c in configs)  # FP8 and NVFP4 steps
    assert {c.split_k for c in candidates(8)} == {1, 2, 4}
    assert {c.persistent for c in candidates(4096)} == {False, True}


def test_lookup_takes_the_largest_tuned_size_not_above_the_rows():
    small, large = list(candidates(8))[3], list(candidates(4096))[5]
    table = {"configs": {"fp8/7168x2048": {"8": asdict(small), "4096": asdict(large)}}}
    assert lookup(table, "fp8", 7168, 2048, 1) == small  # below every entry: the smallest
    assert lookup(table, "fp8", 7168, 2048, 1024) == small  # the decode regime's entry
    assert lookup(table, "fp8", 7168, 2048, 1025) == large  # prefill: below its entries, its smallest
    assert lookup(table, "fp8", 7168, 2048, 65536) == large
    assert lookup(table, "bf16", 7168, 2048, 4096) == default_config(4096, "bf16")  # no entry for this format
    assert lookup({}, "fp8", 7168, 2048, 8) == default_config(8, "fp8")
    assert lookup({}, "fp8", 7168, 2048, 65536) == default_config(65536, "fp8") != default_config(65536, "bf16")


def test_a_prefill_without_prefill_entries_takes_the_prefill_default_not_a_decode_entry():
    decode = list(candidates(8))[3]
    table = {"configs": {"fp8/7168x2048": {"8": asdict(decode), "256": asdict(decode)}}}
    assert lookup(table, "fp8", 7168, 2048, 65536) == default_config(65536, "fp8")
    assert lookup(table, "fp8", 7168, 2048, 1000) == decode
    assert lookup(table, "fp8", 7168, 2048, 65536, large_tiles=False).block_m == 64  # ~100 KiB shared memory cards


def test_fp8_prefill_default_steps_one_scale_block_at_a_time_inside_one_weight_block():
    from moeserve.kernels.moe_gemm import tile_in_one_scale_block

    config = default_config(65536, "fp8")
    assert config.block_k == FP8_BLOCK and tile_in_one_scale_block(2048, config)


def test_tables_in_the_repo_name_their_card_method_and_commands_and_hold_candidates():
    import json

    from moeserve.kernels.tuning import CONFIG_DIR, card_file

    for path in sorted(CONFIG_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        assert card_file(table["card"]) == path
        for shape, entries in table["configs"].items():
            assert all(table["sweeps"][shape][key] for key in ("date", "method", "command")), (path, shape)
            fmt = shape.split("/")[0]
            hidden, intermediate = (int(n) for n in shape.split("/")[1].split("x"))
            for rows in entries:
                assert lookup(table, fmt, hidden, intermediate, int(rows)) in set(candidates(int(rows))), (path, shape, rows)


def test_decode_blocks_widen_when_the_experts_average_more_than_16_rows():
    assert default_config(1024, "bf16", num_experts=32) == GemmConfig(64, 128, 128, swap_ab=True)  # 32 rows each
    assert default_config(1024, "fp8", num_experts=256).block_m == 16  # 4 rows each
    assert default_config(8, "fp8").swap_ab and not default_config(8, "nvfp4").swap_ab
    assert default_config(1024, "nvfp4", num_experts=32) == GemmConfig(16, 128, 128)
    assert default_config(4096, "bf16", num_experts=32).block_m == 128  # prefill
    assert GemmConfig(64, 128, 128, swap_ab=True) in set(candidates(1024))
