"""Which machine a benchmark figure came from: the CPU model and the instruction sets that change which kernels
oneDNN, OpenBLAS and onnxruntime pick (AVX2; AVX-512 with VNNI; AVX-VNNI; AMX). Every benchmark prints `banner()`
first and stores `describe()` with its figures, so a figure always says where it was measured."""
import os
import pathlib
import platform


def describe():
    model, flags = "unknown CPU", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"),
                                   ("AVX-VNNI", "avx_vnni"), ("AMX", "amx_tile")) if flag in flags]
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "machine": platform.machine()}


def banner():
    d = describe()
    return f"machine: {d['cpu']} ({', '.join(d['isa']) or 'no AVX2'}), {d['cores']} cores, {d['machine']}"
