"""What fastlayers was built with and what it can use on this machine."""

from __future__ import annotations

import platform

import torch

from fastlayers import _extension, backend


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cuda_archs(arch_list: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST as GPU targets: '8.0 9.0+PTX' -> 'sm_80, sm_90, compute_90 (PTX)'."""
    if arch_list is None:
        return None
    targets = []
    for entry in arch_list.replace(";", " ").split():
        ptx = entry.endswith("+PTX")
        number = entry.removesuffix("+PTX").replace(".", "")
        targets.append(f"sm_{number}")
        if ptx:
            targets.append(f"compute_{number} (PTX)")
    return ", ".join(targets)


def info() -> dict:
    """Versions, the CPU ISAs compiled and in use, the CUDA build and the GPUs visible."""
    import fastlayers

    build = _extension.BUILD_INFO
    result = {
        "fastlayers": fastlayers.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "extension_loaded": _extension.available(),
        "extension_error": _extension.load_error,
        "built_against_torch": build.get("torch_version"),
        "compiler": build.get("compiler"),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_isas_compiled": build.get("cpu_isas_compiled", "").split(",") if build else [],
        "cpu_isa_active": _extension._C.cpu_isa() if _extension.available() else None,
        "cuda_kernels": bool(build.get("cuda", False)),
        "cuda_archs": describe_cuda_archs(build.get("cuda_archs")),
        "cuda_compiler": build.get("cuda_version"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "backend": backend.get_backend(),
    }
    return result


def format_info(data: dict | None = None) -> str:
    """`info()` as aligned ``key: value`` lines."""
    data = info() if data is None else data
    width = max(len(k) for k in data)
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "none"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
