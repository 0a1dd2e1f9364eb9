"""bnlib's benchmarks (`make bench`, `python -m bnlib.bench`): training throughput of bnlib's
loop against the torchvision reference loop and the bare model step, the machine-tagged
throughput table the cost planner reads, and what each probe costs per call.

    meters      foreign CPU load, peak memory, device sync, median/min/max
    workload    the one model, data and batch size every loop measures
    reference   the popular CIFAR loop (PIL + torchvision transforms + DataLoader workers)
    throughput  bnlib's loop, its ceiling, and the throughput table (throughput.json)
    probe_cost  ms per call of every registered probe
    compare     the interleaved rounds, their summary and ratios
    command     the command line: main()
"""
from .command import bench_machine, main, parser
from .compare import LOOPS, PAIRS, print_comparison, run_rounds, summarize_rounds
from .meters import ForeignLoad, MemoryMeter, summarize, sync, wait_idle
from .probe_cost import probe_costs
from .reference import WARM_IMAGES, PILImages, ReferenceLoop
from .throughput import CeilingLoop, MemoryRecords, bnlib_epoch, throughput_entry, write_throughput
from .workload import BATCH, bench_params

__all__ = ["main", "parser", "bench_machine", "LOOPS", "PAIRS", "run_rounds", "summarize_rounds", "print_comparison",
           "ForeignLoad", "MemoryMeter", "summarize", "sync", "wait_idle", "probe_costs", "WARM_IMAGES",
           "PILImages", "ReferenceLoop", "CeilingLoop", "MemoryRecords", "bnlib_epoch", "throughput_entry",
           "write_throughput", "BATCH", "bench_params"]
