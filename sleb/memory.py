"""Peak memory of this process, in MB: what the CUDA caching allocator reserved, or the resident set on CPU.

Both can be reset, so two measurements in one process (dense, then pruned) are each their own peak:
on CUDA through the allocator's statistics, on Linux by writing 5 to /proc/self/clear_refs, which
resets the kernel's high-water mark of resident memory (VmHWM).
"""

import torch


def reset_peak(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # reserved-but-free blocks would otherwise count towards the next peak
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime peak


def peak_mb(device):
    """Peak since the last reset (CUDA reserved memory, or resident set size on CPU); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return None


def total_bytes() -> int:
    """The machine's physical memory (8 GiB where the system does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
