"""Device facts for ``device.json`` and the ``system`` / ``gpu`` columns.

Imports torch lazily (inside the functions); :func:`system_id_for` needs no torch.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "hardware_profiles"

#: device name (torch.cuda.get_device_name) -> profile id; used when hardware_profiles/ is absent
KNOWN_DEVICES = {
    "NVIDIA H100 80GB HBM3": "h100_sxm",
    "NVIDIA H100 PCIe": "h100_pcie",
    "NVIDIA H200": "h200_sxm",
    "NVIDIA H800": "h800",
    "NVIDIA A100-SXM4-80GB": "a100_sxm",
    "NVIDIA B200": "b200",
}


def _profile_device_names() -> dict[str, str]:
    """device name -> profile id, read from ``hardware_profiles/*.yaml`` (``id`` and
    ``device_names`` lines; a plain regex so that no YAML library is needed)."""
    table: dict[str, str] = {}
    if not PROFILES_DIR.is_dir():
        return table
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        if ".calibrated" in path.name:
            continue
        text = path.read_text(errors="replace")
        pid = re.search(r"^id:\s*['\"]?([\w.-]+)", text, re.M)
        names = re.search(r"^device_names:\s*\[(.*)\]", text, re.M)
        if pid and names:
            for name in re.findall(r"['\"]([^'\"]+)['\"]", names.group(1)):
                table[name] = pid.group(1)
    return table


def system_id_for(device_name: str, device_kind: str) -> str:
    """Default ``system`` column: ``cpu`` on CPU; else the profile whose ``device_names`` holds the
    exact name (no prefix matching: "NVIDIA H100 NVL" is not an H100 SXM); else the lowercased
    name with runs of non-alphanumerics replaced by ``_``."""
    if device_kind == "cpu":
        return "cpu"
    table = {**KNOWN_DEVICES, **_profile_device_names()}
    if device_name in table:
        return table[device_name]
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "unknown"


def cpu_name() -> str:
    name = platform.processor()
    if not name or name in ("x86_64", "aarch64", "arm64", "i386"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or "cpu"


def cpu_cache_bytes() -> dict[str, int]:
    """Data / unified cache sizes in bytes by level (``L1d``, ``L2``, ``L3``), summed over the
    distinct cache instances (sysfs ``shared_cpu_list``), as lscpu reports them; {} where sysfs
    has no cache information."""
    sizes: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    for d in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*")):
        try:
            kind = (d / "type").read_text().strip()
            level = (d / "level").read_text().strip()
            size = (d / "size").read_text().strip()
            shared = (d / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        name = f"L{level}" + ("d" if kind == "Data" else "")
        if (name, shared) in seen:
            continue
        seen.add((name, shared))
        num = size.rstrip("KMG")
        if not num.isdigit():
            continue
        sizes[name] = sizes.get(name, 0) + int(num) * units.get(size[-1], 1)
    return sizes


def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return cpu_name()


def _nvidia_smi_clocks() -> dict | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    fields = ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,"
              "temperature.gpu,ecc.mode.current,mig.mode.current")
    try:
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    vals = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    keys = ["name", "driver_version", "sm_clock_mhz", "mem_clock_mhz", "max_sm_clock_mhz",
            "max_mem_clock_mhz", "power_w", "temperature_c", "ecc_mode", "mig_mode"]
    return {"source": "nvidia-smi", **dict(zip(keys, vals))}


def gpu_clocks() -> dict | None:
    """Clocks / power / temperature of GPU 0 via pynvml, else nvidia-smi, else None."""
    try:
        import pynvml  # type: ignore
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            return {
                "source": "pynvml",
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "max_mem_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable
        return _nvidia_smi_clocks()


def triton_version() -> str | None:
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return f"import failed: {type(e).__name__}: {e}"


def device_facts(device: str) -> dict:
    """Everything ``device.json`` records about the machine (besides the run's own notes)."""
    import numpy
    import torch
    facts: dict = {
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "triton": triton_version(),
            "numpy": numpy.__version__,
            "cuda": torch.version.cuda,
        },
        "cpu": {
            "name": cpu_name(),
            "logical_cores": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
        },
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = {
            "name": torch.cuda.get_device_name(0),
            "sm_count": p.multi_processor_count,
            "compute_capability": f"{p.major}.{p.minor}",
            "total_memory_bytes": p.total_memory,
            "device_count": torch.cuda.device_count(),
        }
        for attr in ("L2_cache_size", "memory_clock_rate", "memory_bus_width", "clock_rate",
                     "uuid"):
            if hasattr(p, attr):
                gpu[attr] = str(getattr(p, attr)) if attr == "uuid" else getattr(p, attr)
        if "memory_clock_rate" in gpu and "memory_bus_width" in gpu:
            # peak = memory clock (kHz) x 2 (DDR) x bus width (bits) / 8  (notes section 1.1)
            gpu["theoretical_dram_gb_per_s"] = round(
                gpu["memory_clock_rate"] * 1e3 * 2 * gpu["memory_bus_width"] / 8 / 1e9, 1)
        facts["gpu"] = gpu
        try:
            facts["versions"]["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            facts["versions"]["nccl"] = None
        facts["versions"]["cudnn"] = torch.backends.cudnn.version()
        facts["clocks_before"] = gpu_clocks()
    else:
        caches = cpu_cache_bytes()
        if caches:
            facts["cpu"]["cache_bytes"] = caches
        try:
            import psutil  # type: ignore
            facts["cpu"]["total_memory_bytes"] = psutil.virtual_memory().total
        except Exception:  # noqa: BLE001
            try:
                for line in Path("/proc/meminfo").read_text().splitlines():
                    if line.startswith("MemTotal:"):
                        facts["cpu"]["total_memory_bytes"] = int(line.split()[1]) * 1024
            except OSError:
                pass
    return facts
