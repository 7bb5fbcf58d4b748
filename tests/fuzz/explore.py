"""Local exploration (not collected by pytest): draw many examples per strategy, run every one, and
group the failures by message, so one run lists every distinct defect instead of the first per test.

    cd tests/fuzz && ../../.venv-c/bin/python explore.py [examples per strategy] [seed]
"""

import collections
import re
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _fuzz_harness as H
import test_fuzz_attention as A
import test_fuzz_fde as F
import test_fuzz_hypercomplex as HC
import test_fuzz_raw_c as RC

STRATS = {
    "products": ("hc_public", HC.product_case()),
    "score_all": ("hc_public", HC.scoring_case("score_all")),
    "rank_all": ("hc_public", HC.scoring_case("rank_all")),
    "topk_all": ("hc_public", HC.scoring_case("topk_all")),
    "one_to_n_loss": ("hc_public", HC.scoring_case("one_to_n_loss")),
    "fde_encode": ("fde_public", F.encode_case()),
    "chamfer": ("chamfer_public", F.chamfer_case()),
    "raw_hc": ("raw_hc", RC.raw_hc_case()),
    "raw_tables": ("raw_fde_tables", RC.raw_table_case()),
    "raw_plan": ("raw_fde_plan", RC.raw_plan_case()),
    "raw_misc": ("raw_misc", RC.raw_misc_case()),
    "selective_attention": ("ssa_public", A.ssa_case()),
    "relative_attention": ("rca_public", A.rca_case()),
    "causal_depthwise_conv": ("conv_public", A.conv_case()),
    "bit_cipher": ("bc_public", A.bit_cipher_case()),
}


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    only = sys.argv[3:] or list(STRATS)
    groups = collections.defaultdict(list)
    for name in only:
        ex, strat = STRATS[name]

        @settings(max_examples=n, derandomize=False, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def run(data):
            spec = data.draw(strat)
            if ex in ("raw_hc", "raw_fde_plan") and spec.get("isa") not in (None, "generic", "avx2", "avx512"):
                spec["isa"] = None
            try:
                H.check(ex, spec, timeout=60)
            except AssertionError as e:
                msg = str(e)
                head = msg.split("\n")[0] + " | " + re.sub(r"\b\d[\d.e+-]*\b", "#", msg.split("\n", 2)[-1][:160])
                groups[(name, head)].append(msg)

        from hypothesis import seed as hseed

        hseed(seed)(run)()
    for (name, head), msgs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shortest = min(msgs, key=len)
        print(f"=== {name}: {len(msgs)}x {head}\n{shortest[:1500]}\n")
    print("cases:", H.STATS["cases"], "failed:", H.STATS["failed"], "crashed:", H.STATS["crashed"])
    H.shutdown()


if __name__ == "__main__":
    main()
