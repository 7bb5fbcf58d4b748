"""System facts for ``python -m embkern info`` and the bench: CPU, ISA level, build, versions, GPU, backends.

:func:`collect_info` / :func:`format_info` are ``info`` (``--json`` prints the
dict); :func:`bench_env` is the machine line of every bench run. Nothing here
runs the bench; only its table formatter is borrowed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Dict, List, Optional

# CPU flags worth knowing for the C++ kernels (x86 /proc/cpuinfo names, ARM "Features").
_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
          "avx512_bf16", "amx_tile", "asimd", "sve")


def _cpuinfo() -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out.get("model name") or out.get("flags") or out.get("Features"):
                        break  # the first processor block describes them all
                    continue
                key, _, val = line.partition(":")
                out.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's marketing name (x86 ``model name``; ARM ``Hardware``/``CPU part``)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Hardware") or info.get("CPU part") or platform.processor() or "unknown"


def cpu_features() -> List[str]:
    """The flags of ``_FLAGS`` this CPU has."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in _FLAGS if f in flags]


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> Dict[str, Any]:
    """Everything ``python -m embkern info`` prints (``--json`` prints this dict)."""
    import torch

    import embkern

    from . import _backends
    from .ops import OPS

    info: Dict[str, Any] = {
        "versions": {
            "embkern": embkern.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": _version("numpy"),
            "triton": _version("triton"),
        },
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "logical_cpus": os.cpu_count(),
                "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "features": cpu_features()},
        "torch_threads": torch.get_num_threads(),
    }
    mod, why = _backends._load_cpu()
    if mod is not None:
        try:
            bi = {k: v for k, v in dict(mod.build_info()).items()}
            bi["isa"] = {k: (list(v) if isinstance(v, list) else v) for k, v in dict(bi.get("isa", {})).items()}
            info["build"] = {"module": "embkern._C", **bi}
        except Exception as exc:
            info["build"] = {"module": "embkern._C", "error": f"build_info failed: {exc}"}
    else:
        info["build"] = {"module": "embkern._C", "error": why}
    cuda: Dict[str, Any] = {}
    cmod, cwhy = _backends._load_cuda()
    if cmod is None:
        cuda["module"] = f"not available: {cwhy}"
    else:
        cuda["module"] = "embkern._C_cuda loaded"
        try:
            rv = int(cmod.runtime_version())
            cuda["runtime_version"] = f"{rv // 1000}.{(rv % 1000) // 10}"
        except Exception as exc:
            cuda["runtime_version"] = f"unknown ({exc})"
        try:
            n, err = cmod.device_count()
            cuda["device_count"] = n
            if n == 0:
                cuda["device_error"] = err
            cuda["devices"] = []
            for i in range(n):
                d = dict(cmod.device_info(i))
                d["capability"] = ".".join(str(c) for c in d.get("capability", ()))
                d["total_memory_gib"] = round(d.pop("total_memory", 0) / 2**30, 1)
                cuda["devices"].append(d)
        except Exception as exc:
            cuda["device_error"] = f"{type(exc).__name__}: {exc}"
    cuda["torch_cuda"] = {"available": torch.cuda.is_available(), "built_with": torch.version.cuda,
                          "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                          if torch.cuda.is_available() else []}
    info["cuda"] = cuda
    info["triton"] = {"interpret": _backends.triton_interpret(),
                      "status": (lambda s: "ok" if s.ok else s.reason)(_backends._triton_import())}
    info["ops"] = {}
    for name, opmod in OPS.items():
        try:
            info["ops"][name] = _backends.report(opmod.DESCRIPTOR)
        except Exception as exc:  # a broken op module must not hide the others
            info["ops"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def format_info(info: Dict[str, Any]) -> str:
    """The text of ``python -m embkern info`` from :func:`collect_info`'s dict."""
    from .bench.report import table  # the one table formatter (stdlib only; the bench runs nothing here)

    lines = []
    v = info["versions"]
    lines.append("embkern " + v["embkern"] + "  |  " + "  ".join(
        f"{k} {v[k] if v[k] else '(not installed)'}" for k in ("python", "torch", "numpy", "triton")))
    lines.append(f"platform: {info['platform']}")
    c = info["cpu"]
    lines.append(f"cpu:      {c['model']}  ({c['usable_cpus'] or c['logical_cpus']} usable of "
                 f"{c['logical_cpus']} logical CPUs; torch threads {info['torch_threads']})")
    lines.append(f"          features: {' '.join(c['features']) or '(none of ' + ', '.join(_FLAGS[:6]) + ')'}")
    b = info["build"]
    if "error" in b:
        lines.append(f"build:    embkern._C unavailable: {b['error']}")
    else:
        isa = b.get("isa") or {}
        lines.append(f"build:    embkern._C {b.get('version')}, compiler {b.get('compiler')}, OpenMP "
                     f"{b.get('openmp')} ({b.get('omp_max_threads')} threads)")
        active = isa.get("active") or f"none: {isa.get('error')}"
        req = isa.get("requested")
        lines.append(f"cpu isa:  active {active}"
                     + (f" (EMBKERN_CPU_ISA={req})" if req else f" (best this CPU runs; {isa.get('env_var')}="
                        "generic|avx2|avx512 forces a lower level)"))
        lines.append(f"          built: {', '.join(isa.get('compiled') or [])};  this CPU runs: "
                     f"{', '.join(isa.get('available') or [])}")
    cu = info["cuda"]
    lines.append(f"cuda:     {cu['module']}" + (f", runtime {cu['runtime_version']}" if "runtime_version" in cu else ""))
    if "device_count" in cu:
        if cu["device_count"]:
            for d in cu["devices"]:
                lines.append(f"          GPU {d['index']}: {d['name']} (sm_{d['capability'].replace('.', '')}, "
                             f"{d['multiprocessors']} SMs, {d['total_memory_gib']} GiB)")
        else:
            lines.append(f"          no CUDA device: {cu.get('device_error') or 'count is 0'}")
    elif "device_error" in cu:
        lines.append(f"          device query failed: {cu['device_error']}")
    tc = cu["torch_cuda"]
    lines.append(f"          torch.cuda: {'available' if tc['available'] else 'not available'}"
                 f" (torch built with CUDA {tc['built_with'] or 'none'})"
                 + (": " + ", ".join(tc["devices"]) if tc["devices"] else ""))
    tr = info["triton"]
    lines.append(f"triton:   {tr['status']}" + ("  (TRITON_INTERPRET=1: interpreter on CPU)" if tr["interpret"] else ""))
    for op, st in info["ops"].items():
        lines.append("")
        lines.append(f"op {op}")
        if "error" in st:
            lines.append(f"  status unavailable: {st['error']}")
            continue
        rows = [[be, s["active"], s["reason"] or "-"] for be, s in st.items()]
        lines += ["  " + ln for ln in table(["backend", "active", "reason"], rows).splitlines()]
        partial = [be for be, s in st.items() if s["active"] == "partial"]
        if partial:
            kernels = list(st[partial[0]]["kernels"])
            lines.append(f"  per kernel ({', '.join(partial)} partial):")
            rows = [[k] + ["yes" if st[be]["kernels"].get(k, [False, ""])[0] else "no" for be in st] for k in kernels]
            lines += ["    " + ln for ln in table(["kernel", *st], rows).splitlines()]
            for be in partial:
                reasons = dict.fromkeys(r for ok, r in st[be]["kernels"].values() if not ok)
                for r in reasons:
                    lines.append(f"    {be}: {r}")
    return "\n".join(lines)


def bench_env(device) -> Dict[str, Any]:
    """The machine line of a bench run (``bench.json``'s ``env``): versions, CPU, ISA level, threads, GPU."""
    import torch

    import embkern

    from . import _backends

    info = {"embkern": embkern.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "torch_threads": torch.get_num_threads()}
    mod, why = _backends._load_cpu()
    if mod is not None:
        try:
            bi = dict(mod.build_info())
            info["omp_threads"] = int(mod.get_num_threads()) if hasattr(mod, "get_num_threads") else bi.get(
                "omp_max_threads")
            info["cpu_isa"] = dict(bi.get("isa", {})).get("active")
        except Exception as exc:
            info["cpu_module"] = f"build_info failed: {exc}"
    else:
        info["cpu_module"] = why
    info["cpu"] = cpu_model()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
