"""The machine a benchmark ran on, recorded beside its numbers (these machines are shared and noisy)."""

from __future__ import annotations

import os
import platform
import sys


def describe_machine() -> dict:
    """Platform, cores, library versions, BLAS, torch threads (when torch is loaded) and the load average."""
    import numpy as np

    try:
        from threadpoolctl import threadpool_info

        blas = [{k: lib.get(k) for k in ("internal_api", "version", "architecture")} for lib in threadpool_info()]
    except ImportError:
        blas = None
    described = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "load_average": load_average(),
    }
    torch = sys.modules.get("torch")  # only when the benchmark uses it: importing torch costs seconds
    if torch is not None:
        described.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return described


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load: other jobs on the machine share its cores, and this says how much."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
