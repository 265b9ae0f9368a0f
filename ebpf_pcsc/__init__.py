"""pcsc-ebpf-spy: trace the PC/SC calls of any process with eBPF uprobes and
print them as pcsc-lite's pcsc-spy does."""
__version__ = "0.1.0"
