"""NCCL communicator memory on each GPU of a multi-GPU training job (issue 11: no longer an under-count).

Every process group a training engine runs a collective or a send/recv on gets its own NCCL communicator
(PyTorch ProcessGroupNCCL creates it lazily, at the first operation on the group and device:
torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp ``getNCCLComm``), and each communicator holds device buffers
for every peer it is connected to, on every channel, until the process group is destroyed: alive for the whole
step (registry: ``runtime/nccl_communicators``). They sit outside PyTorch's caching allocator (cuMem/cudaMalloc
by NCCL itself), so they are a runtime row, not part of the allocator reserve's base.

Source constants (github NVIDIA/nccl at 5067397, NCCL 2.30 development; unchanged since 2.21 for these):
- src/include/device.h: ``NCCL_STEPS`` 8, ``NCCL_LL_LINES_PER_THREAD`` 8, ``NCCL_LL_MAX_NTHREADS`` 512,
  ``NCCL_LL128_ELEMS_PER_THREAD`` 120, ``NCCL_LL128_MAX_NTHREADS`` 640; ``union ncclLLFifoLine`` is 16 bytes.
- src/init.cc ``computeBuffSizes``: per connection, the LL buffer (8·512·8·16 = 512 KiB), the LL128 buffer
  (120·640·8·8 B) and the Simple buffer ``NCCL_BUFFSIZE`` (default 1 << 22 = 4 MiB).
- src/transport/p2p.cc: the receiving GPU of each connection holds the three protocol buffers; with cuMem (NCCL
  >= 2.19 default, "P2P/CUMEM" in the logs) each allocation is rounded up to the 2 MiB granularity. NCCL's
  allocation log on 8 x H100 shows exactly this: one 10,485,760 B allocation (the 9.19 MiB of buffers rounded up)
  and one 2,097,152 B allocation per connection and channel (NVIDIA/nccl issue #1685).
- src/transport/nvls.cc ``ncclNvlsBufferSetup``: NVLink SHARP (NVSwitch Hopper/Blackwell, ``NCCL_NVLS_ENABLE``
  default 2 = on where supported) adds ``nvlsChannels · 2 · NCCL_NVLS_CHUNKSIZE · NCCL_STEPS · nHeads`` bytes,
  ``NVLS_NCHANNELS_SM90`` 16, ``NVLS_NCHANNELS_SM100_NVL`` 24, chunk 128 KiB (NCCL < 2.21: ``NCCL_BUFFSIZE``
  instead of the chunk, 4x more; pass ``nccl_nvls_chunksize=512 KiB`` to model those), nHeads the GPUs of the node.

Choices (the channel count comes from NCCL's topology search, which memplan cannot rerun): 32 channels for a
communicator inside one node (NCCL's log on 8 x H100, issue #1685), 16 for one across nodes (the larger of the
published multi-node logs), both capped by ``NCCL_MAX_NCHANNELS``; every channel connected for ring and tree
(NCCL >= 2.22 connects an algorithm only when first used, NCCL_RUNTIME_CONNECT); inter-node (net) connections
counted as intra-node ones (the net transport keeps the LL buffer in host memory: 0.5 MiB less each); NCCL's
small per-communicator structures (work FIFO, channel tables, a few MiB) and the CUDA module of NCCL's kernels
left out. These err both ways, so the row is an estimate, not a bound. More communicators = more memory unless
split with shared resources (sjeaugey, NVIDIA/nccl issues #864, #986); NCCL_COMM_SPLIT_SHARE_RESOURCES is not
modelled. RCCL (AMD) is NCCL's fork with the same buffer structure; its channel counts are not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.units import KiB, MiB, round_up

NCCL_STEPS = 8
LL_LINES_PER_THREAD = 8
LL_MAX_NTHREADS = 512
LL_FIFO_LINE_BYTES = 16
LL128_ELEMS_PER_THREAD = 120
LL128_MAX_NTHREADS = 640
LL128_ELEM_BYTES = 8
LL_BUFFSIZE = LL_LINES_PER_THREAD * LL_MAX_NTHREADS * NCCL_STEPS * LL_FIFO_LINE_BYTES
"""NCCL ``DEFAULT_LL_BUFFSIZE`` (src/init.cc): 524,288 B."""
LL128_BUFFSIZE = LL128_ELEMS_PER_THREAD * LL128_MAX_NTHREADS * NCCL_STEPS * LL128_ELEM_BYTES
"""NCCL ``DEFAULT_LL128_BUFFSIZE`` (src/init.cc): 4,915,200 B."""
DEFAULT_BUFFSIZE = 4 * MiB
"""NCCL ``DEFAULT_BUFFSIZE`` (src/init.cc, ``1 << 22``): the Simple protocol's buffer; env ``NCCL_BUFFSIZE``."""
CUMEM_GRANULARITY = 2 * MiB
"""cuMem allocation granularity NCCL rounds each buffer allocation up to (issue #1685's ALLOC log: 10 MiB, 2 MiB)."""
SEND_SIDE_BYTES = CUMEM_GRANULARITY
"""The sending GPU's allocation per connection and channel: one granule (issue #1685's 2,097,152 B allocations)."""
DEFAULT_CHANNELS = 32
"""Channels of a communicator inside one node: NCCL's log on 8 x H100 (issue #1685, channels 00-31 per pair); the
ceiling ``NCCL_MAX_NCHANNELS`` sets (src/graph/connect.cc ``ncclMaxNchannels``)."""
MULTI_NODE_CHANNELS = 16
"""Channels of a communicator that spans nodes: its rings cross the NICs, so the topology search finds about one
channel per NIC, doubled in src/graph/connect.cc (``nChannels * 2``; on sm90 again below 16 when the ring's bandwidth
exceeds 45 GB/s). Published logs: 8 channels for 2 x 8 GPUs (NVIDIA/nccl #1412), 16 on an H100 cluster (#1453);
the larger is taken."""
NET_P2P_CHANNELS_PER_PEER = 2
"""Send/recv channels per peer in a communicator that spans nodes: src/graph/paths.cc ``ncclTopoGetNchannels``
(``nNetChannels = 2``, at least one per NIC; the per-peer count is the minimum over all peers, so remote peers set
it for the whole communicator; ``NCCL_NCHANNELS_PER_NET_PEER``)."""
NVLS_CHANNELS = {9: 16, 10: 24}
"""``NVLS_NCHANNELS_SM90`` and ``NVLS_NCHANNELS_SM100_NVL`` (src/transport/nvls.cc), by compute capability major."""
NVLS_CHUNKSIZE = 128 * KiB
"""``NCCL_NVLS_CHUNKSIZE`` default (src/transport/nvls.cc, NCCL >= 2.21)."""
NVLS_GPUS = {"h100-sxm-80gb": 9, "h200-sxm-141gb": 9, "h800-sxm-80gb": 9, "b200-sxm-180gb": 10}
"""Catalog GPUs that sit on an NVSwitch with multicast (NVLS): SXM Hopper and Blackwell, by compute capability."""
SOURCE = ("NVIDIA/nccl src/init.cc computeBuffSizes, src/include/device.h, src/transport/p2p.cc, "
          "src/transport/nvls.cc ncclNvlsBufferSetup; NCCL's ALLOC log in NVIDIA/nccl issue #1685")


@dataclass(frozen=True)
class NcclSettings:
    """The NCCL environment the job runs with, under NCCL's own names (``EngineConfig.nccl_*``)."""

    buffsize: int = DEFAULT_BUFFSIZE
    max_nchannels: int = DEFAULT_CHANNELS
    nvls_enable: int = 2
    nvls_chunksize: int = NVLS_CHUNKSIZE


def receive_bytes(buffsize: int) -> int:
    """Bytes the receiving GPU allocates for one connection on one channel.

    Formula: round_up(LL + LL128 + NCCL_BUFFSIZE, 2 MiB); 10 MiB at the defaults.
    Source: src/init.cc ``computeBuffSizes``, src/transport/p2p.cc (all three protocols' buffers per connection),
    cuMem granularity (issue #1685). Assumption: cuMem on (NCCL >= 2.19's default); without it, under 1 MiB less.
    """
    raw = LL_BUFFSIZE + LL128_BUFFSIZE + buffsize
    return round_up(raw, CUMEM_GRANULARITY)


def connection_pair_bytes(s: NcclSettings) -> int:
    """Bytes one GPU holds per channel for one neighbour it both receives from and sends to (12 MiB default)."""
    return receive_bytes(s.buffsize) + SEND_SIDE_BYTES


def channels(spans_nodes: bool, s: NcclSettings) -> int:
    """Channels of one collective communicator: ``DEFAULT_CHANNELS`` inside a node, ``MULTI_NODE_CHANNELS`` across
    nodes, capped by ``NCCL_MAX_NCHANNELS``."""
    return min(MULTI_NODE_CHANNELS if spans_nodes else DEFAULT_CHANNELS, s.max_nchannels)


def collective_bytes(ranks: int, spans_nodes: bool, s: NcclSettings) -> int:
    """Ring and tree buffers of one collective communicator of ``ranks`` ranks, per GPU, in bytes.

    Formula: channels × neighbours × (receive + send side), neighbours 1 for two ranks (the ring's and the tree's
    peer are the same GPU) and 2 above (the ring's previous rank and the tree chain's other neighbour);
    0 for one rank. Source: src/graph/connect.cc (ring prev/next, tree up/down per channel); src/transport.cc
    connects each (channel, peer) once. Assumptions: ring and tree both connected; an inter-node tree rank can have
    two children (NCCL_MAX_TREE_ARITY 3), counted as one, so across many nodes this is not an upper bound.
    """
    if ranks <= 1:
        return 0
    neighbours = 1 if ranks == 2 else 2
    return channels(spans_nodes, s) * neighbours * connection_pair_bytes(s)


def p2p_bytes(peers: int, spans_nodes: bool, s: NcclSettings) -> int:
    """Send/recv buffers of ``peers`` peers (pipeline neighbours, all-to-all partners), per GPU, in bytes.

    Formula: peers × channels per peer × (receive + send side), channels per peer ``NCCL_MAX_NCHANNELS``-capped
    ``DEFAULT_CHANNELS`` inside a node, ``NET_P2P_CHANNELS_PER_PEER`` when the communicator spans nodes.
    Source: src/transport/p2p.cc, src/graph/paths.cc ``ncclTopoComputeP2pChannelsPerPeer``; NCCL's log of one
    all-to-all on 8 x H100 (issue #1685: 32 channels per pair, one 10 MiB and one 2 MiB allocation each).
    Assumption: remote peers' buffers counted as private (NCCL_NET_SHARED_BUFFERS pools them: fewer bytes).
    """
    per_peer = min(NET_P2P_CHANNELS_PER_PEER if spans_nodes else DEFAULT_CHANNELS, s.max_nchannels)
    return max(peers, 0) * per_peer * connection_pair_bytes(s)


def nvls_bytes(local_ranks: int, gpu_name: str, s: NcclSettings) -> int:
    """NVLink SHARP buffers of one communicator with ``local_ranks`` GPUs on this node, per GPU, in bytes.

    Formula: min(nvlsChannels, NCCL_MAX_NCHANNELS) × 2 × NCCL_NVLS_CHUNKSIZE × NCCL_STEPS × nHeads, rounded up to
    2 MiB (``NVLS_MEM_ALIGN_SIZE``); nHeads = local_ranks; 0 off NVSwitch GPUs, with NCCL_NVLS_ENABLE=0, or for
    one local rank. Source: src/transport/nvls.cc ``ncclNvlsTuning``, ``ncclNvlsBufferSetup``.
    """
    major = NVLS_GPUS.get(gpu_name)
    if major is None or s.nvls_enable == 0 or local_ranks <= 1:
        return 0
    channels = min(NVLS_CHANNELS[major], s.max_nchannels)
    raw = channels * 2 * s.nvls_chunksize * NCCL_STEPS * local_ranks
    return round_up(raw, CUMEM_GRANULARITY)
