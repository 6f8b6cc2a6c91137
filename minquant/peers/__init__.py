"""Other tools run side by side with minquant in `minquant bench` (notebooks 07-08 show the results;
each in its own venv: they pin versions of transformers that minquant's environment does not use).
Not imported by minquant itself."""


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started.

    Not `resource.getrusage(...).ru_maxrss`: on Linux that survives exec, so a peer started by the
    bench would report the bench's own peak if it was higher. VmHWM belongs to this program alone.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")
