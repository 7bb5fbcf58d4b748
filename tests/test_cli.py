"""`python -m embkern info` / `bench` (subprocesses of the installed package) and the bench helpers."""

import json
import os
import subprocess
import sys

import pytest
import torch

import embkern
from embkern import _backends, bench
from embkern._env import collect_info, format_info
from embkern.__main__ import main as cli_main
from embkern.ops import OPS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args, cwd, timeout=600, env=None):
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # the CLI must work without the test-suite's interpreter setting
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "embkern", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_info_lists_every_op_and_backend(tmp_path):
    p = _run(["info"], tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"embkern {embkern.__version__}" in out
    assert "torch" in out and "cpu:" in out and "build:" in out and "cuda:" in out
    for op in OPS:
        assert f"op {op}" in out
    block = out[out.index("\nop "):]
    for be in _backends.BACKENDS:
        assert f"\n  {be} " in block


def test_info_json_matches_backend_status(capsys):
    assert cli_main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"versions", "cpu", "build", "cuda", "triton", "ops"}
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["ops"]) == set(OPS)
    for op, mod in OPS.items():
        st = info["ops"][op]
        assert set(st) == set(_backends.BACKENDS)
        assert st["reference"]["active"] == "yes"
        for be, s in st.items():
            assert s["active"] in ("yes", "no", "partial")
            kernels = s["kernels"]
            n_ok = sum(ok for ok, _ in kernels.values())
            assert s["active"] == ("yes" if n_ok == len(kernels) else "no" if n_ok == 0 else "partial")
            if s["active"] != "yes":
                assert s["reason"], f"{op}/{be} is inactive without a reason"
        # per-kernel answers agree with the resolver the ops use
        for k, (ok, _) in st["cpu"]["kernels"].items():
            assert ok == _backends.check(mod.DESCRIPTOR, "cpu", (k,), "cpu", torch.float32).ok


def test_info_text_shows_partial_backends_per_kernel(monkeypatch):
    # A backend that implements some kernels and not others must say which.
    info = collect_info()
    op = next(iter(info["ops"]))
    st = info["ops"][op]["reference"]
    kernels = dict(st["kernels"])
    if len(kernels) < 2:
        pytest.skip("op has a single kernel")
    first = next(iter(kernels))
    kernels[first] = [False, "kernel missing for this test"]
    info["ops"][op]["cpu"] = {"active": "partial", "reason": f"{len(kernels) - 1}/{len(kernels)} kernels; "
                              f"missing {first}", "kernels": kernels}
    text = format_info(info)
    assert "per kernel (cpu partial)" in text
    assert "cpu: kernel missing for this test" in text


def test_bench_quick_tiny_writes_json_and_png(tmp_path):
    j, png = tmp_path / "out" / "b.json", tmp_path / "b.png"
    p = _run(["bench", "--op", "hypercomplex", "--quick", "--tiny", "--no-progress", "--no-extra",
              "--json", str(j), "--plot", str(png)], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "score_all" in p.stdout and "vs anchor" in p.stdout
    res = json.loads(j.read_text())
    assert set(res) >= {"env", "options", "results", "targets", "memory_method", "timing_method", "extra"}
    assert res["options"]["quick"] is True and res["options"]["tiny"] is True
    assert res["options"]["ops"] == ["hypercomplex"]
    rows = res["results"]
    groups = {r["group"] for r in rows}
    assert groups >= {"score_all", "rank_all", "topk_all", "one_to_n_loss"}
    keys = {"op", "workload", "backend", "kind", "status", "median_s", "min_s", "max_s", "times_s", "throughput",
            "speedup_vs_reference", "speedup_vs_anchor", "peak_extra_bytes", "max_abs_error"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, rows
    for r in ok:
        assert keys <= set(r), keys - set(r)
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert len(r["times_s"]) >= 1
    assert not [r for r in rows if r["status"] == "error"], [r["reason"] for r in rows if r["status"] == "error"]
    refs = [r for r in ok if r["backend"] == "reference"]
    assert refs and all(r["speedup_vs_reference"] == pytest.approx(1.0) for r in refs)
    # every reference row is compared with the fp64 reference, and agrees to fp32 rounding
    for r in refs:
        assert r["max_abs_error"] is not None and r["max_abs_error"] < 1e-3, r
    anchors = {r["backend"] for r in ok if r["kind"] == "anchor"}
    assert "torch.mm" in anchors and "pykeen" in anchors
    # every backend the machine has for an op is either timed or skipped with a reason
    for r in rows:
        if r["status"] == "skipped":
            assert r["reason"]
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bench_rejects_bad_options(capsys):
    # in-process: the checks run before any workload is built
    assert cli_main(["bench", "--op", "no_such_op", "--no-progress", "--json", "", "--plot", ""]) == 2
    assert "no_such_op" in capsys.readouterr().err
    assert cli_main(["bench", "--repeat", "0", "--no-progress", "--json", "", "--plot", ""]) == 2
    assert "--repeat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--device", "tpu"])


def test_discover_skips_ops_without_workloads(monkeypatch):
    monkeypatch.setitem(OPS, "no_bench_op", object())
    found, missing = bench.discover()
    assert "hypercomplex" in found
    assert "no_bench_op" in missing and "no workload module" in missing["no_bench_op"]
    with pytest.raises(ValueError, match="not_an_op"):
        bench.discover(["not_an_op"])


def test_cpu_peak_memory_sees_an_allocation():
    peak = bench.timing.CpuPeak()
    if not peak.ok:
        pytest.skip(peak.reason)
    nbytes = 64 * 2**20

    def alloc():
        x = torch.empty(nbytes // 4, dtype=torch.float32)
        x.fill_(1.0)  # touch every page: untouched pages are not resident
        return float(x[-1])

    out, extra = peak.measure(alloc)
    assert out == 1.0
    assert extra >= 0.9 * nbytes, extra
    _, small = peak.measure(lambda: torch.ones(16).sum())
    assert small < nbytes // 4, small  # the 64 MiB of the previous call are not counted again


def test_time_call_returns_requested_samples():
    calls = []
    samples = bench.timing.time_call(lambda: calls.append(1), torch.device("cpu"), repeat=4)
    assert len(samples) == 4 and all(s > 0 for s in samples)
    assert len(calls) >= 6  # warm-up(s) + one or more calls per sample


def test_plot_and_extra_report_formatting(tmp_path):
    rows = [
        {"op": "hypercomplex", "workload": "w", "group": "g", "backend": "reference", "kind": "reference",
         "status": "ok", "median_s": 2e-3, "speedup_vs_reference": 1.0},
        {"op": "hypercomplex", "workload": "w", "group": "g", "backend": "torch.mm", "kind": "anchor",
         "status": "ok", "median_s": 1e-3, "speedup_vs_reference": 2.0},
    ]
    extras = {"hypercomplex": {"title": "Kinships", "rows": [{"algebra": "quaternion", "mrr": 0.5}],
                               "notes": ["a note"],
                               "panels": [{"title": "p", "kind": "bar", "x": ["mrr"], "series": {"q": [0.5]}},
                                          {"title": "l", "kind": "line", "x": [1, 2], "series": {"s": [1, 3]},
                                           "logx": True}]}}
    text = bench.report.format_extra("hypercomplex", extras["hypercomplex"])
    assert "Kinships" in text and "0.5000" in text and "a note" in text
    # a second table with its own columns, printed after the rows and before the notes
    extra2 = dict(extras["hypercomplex"], tables=[{"title": "memory", "rows": [{"L": 16384, "peak": 2.25}]}])
    text2 = bench.report.format_extra("hypercomplex", extra2)
    lines = text2.splitlines()
    at = lines.index("hypercomplex: memory")
    assert lines[at + 1].split() == ["L", "peak"] and lines[at + 3].split() == ["16384", "2.2500"]
    assert lines.index("  note: a note") > at and "algebra" in text2.split("hypercomplex: memory")[0]
    path = tmp_path / "x" / "c.png"
    assert bench.report.plot(str(path), rows, extras) is None
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_tiny_flag_shrinks_hypercomplex_workloads(monkeypatch):
    monkeypatch.setenv(bench.TINY_ENV, "1")
    from embkern.bench import hypercomplex as hb

    ws = hb.workloads(quick=True, device=torch.device("cpu"))
    assert ws and all(w.params["N"] < 1000 for w in ws)
    names = [w.name for w in ws]
    assert len(names) == len(set(names))
    for w in ws:
        assert "reference" in w.backends or "reference" in w.skipped
