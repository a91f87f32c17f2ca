"""The step's communication: the gradient all-reduce inside a node and between nodes, and what of it
adds to the step.

The model, each piece a documented assumption (the table: tables/interconnects.yaml):

- What moves: the gradients, fp32, 4 bytes per parameter of the padded model. model/train.py wraps the
  fp32 model in DDP with no communication hook, so DDP all-reduces the fp32 .grad tensors (autocast runs
  the matmuls in bf16, the gradients stay fp32). Once per optimizer step: model/step.py syncs only in the
  last micro-step's backward (require_backward_grad_sync), whatever the gradient accumulation.
- Inside a node (NVLink): a ring all-reduce, each GPU sending 2(g-1)/g of the bytes. The calibration
  points are whole 8-GPU nodes' measured step times, so the calibrated MFU already pays for it: shown,
  never added (one node's estimate is what it was before this module).
- Between nodes: NCCL's ring over all N ranks moves 2(N-1)/N of the bytes through each rank, and across
  nodes its bus bandwidth is bounded by each node's network, all its NICs together (nccl-tests'
  convention: the bus bandwidth approaches the bottleneck link's), at link_efficiency of line rate.
  Latency (a few microseconds per hop) is left out: at these sizes the bytes dominate.
- Overlap: DDP all-reduces each ~25 MB bucket as soon as its gradients are ready, behind the rest of the
  backward. The tied token embedding's gradient (and the position embedding's) is complete only when the
  backward reaches the input, its very end, so that share of the bytes never overlaps; the rest hides
  behind the last micro-step's backward (2/3 of its FLOPs), as far as that lasts. Only the rest adds to
  the step. An upper bound on overlap (NCCL's kernels share the GPU with the backward): a measured
  multi-node run (`gpt2cloud report`) recalibrates the link efficiency that all of this rests on.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

from gpt2cloud.cost.hardware import table, user_points
from gpt2cloud.cost.prices import Price
from model.config import GPTConfig

GRADIENT_BYTES_PER_PARAM = 4  # fp32 gradients (see above); cost/estimate.py's memory model counts the same
BACKWARD_SHARE = 2 / 3  # of a micro-step's FLOPs: 6N = 2N forward + 4N backward
NETWORK_KIND = "network"  # the user calibration file's kind of a multi-node run's measured network point
# The clouds on which a launch of several nodes asks SkyPilot for `network_tier: best` (the fabric between the
# nodes): the interconnect table's list, which gpt2cloud/launch/task.py asks by and the estimate assumes by.
NETWORK_TIER_CLOUDS: tuple = tuple(str(c).lower() for c in table("interconnects")["network_tier_clouds"])


@dataclass(frozen=True)
class Interconnect:
    gbps: float  # the node's network between nodes, all its NICs together, one direction, line rate
    source: str  # printed next to the estimate
    key: str = ""  # "cloud instance": what a measured link efficiency belongs to ("" unknown offering)


@dataclass(frozen=True)
class Comm:
    """One optimizer step's gradient all-reduce."""
    gradient_bytes: float
    intra_node_seconds: float  # over NVLink: already in the calibrated MFU, not added
    inter_node_seconds: float  # between nodes, before overlap (0 on one node)
    exposed_seconds: float  # what of it the backward does not hide: added to the step
    overlap: float  # the share of inter_node_seconds hidden behind the backward
    link_efficiency: float
    efficiency_source: str


def _matches(row: dict, price: Optional[Price], gpu: str) -> bool:
    if gpu in row.get("gpus", ()):
        return True
    if price is None or not price.cloud or price.cloud.lower() != row["cloud"]:
        return False
    instance = price.instance.lower()
    return any(instance.startswith(p.lower()[:-1]) if p.endswith("*") else instance == p.lower()
               for p in row.get("instances", ()))


def asks_for_network_tier(infra: str, nodes: int, image: str = "") -> bool:
    """Whether a launch of `nodes` nodes on `infra` (cloud[/region]) asks SkyPilot for network_tier: best:
    several nodes, a cloud in NETWORK_TIER_CLOUDS, and no cloud machine image (SkyPilot refuses the tier
    beside one; a docker: image is fine)."""
    if nodes < 2 or (image and not image.startswith("docker:")):
        return False
    return infra.split("/")[0].lower() in NETWORK_TIER_CLOUDS


def interconnect_for(price: Optional[Price], gpu: str, given_gbps: Optional[float] = None,
                     image: str = "") -> Interconnect:
    """The network between this launch's nodes: --interconnect-gbps, else the table's row for the price's
    cloud and instance (or the GPU type that names its network), else the conservative default. A row whose
    fabric needs network_tier: best, on a launch that does not ask for it (its cloud or its --image), is not
    used: the default is, and its source says why."""
    key = f"{price.cloud} {price.instance}".lower() if price is not None and price.cloud and price.instance else ""
    if given_gbps is not None:
        return Interconnect(float(given_gbps), "--interconnect-gbps", key)
    rows = table("interconnects")
    if price is not None and len({c for c, _ in price.candidates}) > 1:
        d = rows["default"]  # any_of over clouds: it may land on any of them, so the conservative figure
        return Interconnect(float(d["gbps"]), f"any_of over {len(price.candidates)} clouds: the default, "
                                              f"{d['fabric']} ({d['as_of']})")
    for row in rows["offerings"]:
        if _matches(row, price, gpu):
            if row.get("network_tier") == "best" and not asks_for_network_tier(row["cloud"], 2, image):
                d = rows["default"]
                why = ("beside a cloud machine image (--image)" if row["cloud"] in NETWORK_TIER_CLOUDS
                       else f"on {row['cloud']} (it does so only on {', '.join(NETWORK_TIER_CLOUDS)})")
                # a network measured on it (gpt2cloud report) is of this network, not of the fabric's
                return Interconnect(float(d["gbps"]), f"{d['fabric']}: the default, not {row['fabric']}: the launch "
                                                      f"asks for no network_tier: best {why} ({d['as_of']})",
                                    f"{key} without network_tier" if key else "")
            needs = f"; needs {row['needs']}" if row.get("needs") else ""
            return Interconnect(float(row["gbps"]), f"{row['fabric']}: {row['source']} ({row['as_of']}){needs}", key)
    d = rows["default"]
    return Interconnect(float(d["gbps"]), f"{d['fabric']}: {d['source']} ({d['as_of']})", key)


def link_efficiency(key: str) -> tuple[float, str]:
    """NCCL's share of line rate between nodes: the median of this user's multi-node runs on the same cloud
    and instance (`gpt2cloud report`), else the table's assumption."""
    measured = []
    for p in user_points():
        if p.get("kind") == NETWORK_KIND and key and p.get("interconnect") == key:
            value = p.get("link_efficiency")
            if isinstance(value, (int, float)) and 0 < value <= 1:
                measured.append(float(value))
    if measured:
        return statistics.median(measured), f"median of {len(measured)} of your multi-node runs on {key} (gpt2cloud report)"
    row = table("interconnects")["link_efficiency"]
    return float(row["value"]), row["source"]


def intra_node_bytes_per_second(gpu: str) -> tuple[float, str]:
    """One GPU's link to the others in its node, one direction, and where the figure comes from."""
    rows = table("interconnects")["intra_node"]
    row = rows.get(gpu, rows["default"])
    return row["gbytes_per_s"] * 1e9, f"{row['link']}: {row['source']}"


def ring_seconds(nbytes: float, ranks: int, bytes_per_second: float) -> float:
    """A ring all-reduce: each rank sends (and receives) 2(N-1)/N of the bytes at the ring's bandwidth."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / bytes_per_second


def overlappable_share(m: GPTConfig) -> float:
    """The share of the gradient bytes DDP can all-reduce before the backward ends: all but the
    embeddings' (tied token embedding, padded, and positions), which are complete only at its very end."""
    embeddings = (m.padded_vocab_size + m.block_size) * m.n_embd
    return 1 - embeddings / m.param_count(padded=True)


def exposed_seconds(comm: float, share: float, window: float) -> float:
    """What of `comm` seconds of all-reduce adds to the step: at most `share` of it hides, and only as long
    as the backward `window` lasts."""
    return comm - min(share * comm, window)


def comm_from_exposed(exposed: float, share: float, window: float) -> float:
    """The all-reduce seconds that leave `exposed` seconds in the step (exposed_seconds inverted: it
    grows with comm, slope 1 - share until the window is full, then 1)."""
    if exposed <= 0:
        return 0.0
    if share < 1 and share * exposed / (1 - share) <= window:
        return exposed / (1 - share)
    return exposed + window


def step_comm(m: GPTConfig, gpu: str, gpus_per_node: int, nodes: int, compute_seconds: float, grad_accum: int,
              net: Interconnect) -> Comm:
    """One optimizer step's all-reduce on this hardware: compute_seconds is the step's compute (the
    calibrated MFU's, intra-node all-reduce included), grad_accum its micro-steps."""
    nbytes = GRADIENT_BYTES_PER_PARAM * m.param_count(padded=True)
    nvlink, _ = intra_node_bytes_per_second(gpu)
    efficiency, efficiency_source = link_efficiency(net.key)
    # shown only: at the table's assumed efficiency (a measured one belongs to the network between nodes)
    intra = ring_seconds(nbytes, gpus_per_node, nvlink * table("interconnects")["link_efficiency"]["value"])
    if nodes <= 1:
        return Comm(nbytes, intra, 0.0, 0.0, 0.0, efficiency, efficiency_source)
    inter = ring_seconds(nbytes, gpus_per_node * nodes, net.gbps * 1e9 / 8 * efficiency)
    window = BACKWARD_SHARE * compute_seconds / max(1, grad_accum)  # the last micro-step's backward
    exposed = exposed_seconds(inter, overlappable_share(m), window)
    return Comm(nbytes, intra, inter, exposed, 1 - exposed / inter, efficiency, efficiency_source)


def measured_link_efficiency(m: GPTConfig, gpus_per_node: int, nodes: int, gbps: float, compute_seconds: float,
                             grad_accum: int, measured_step_seconds: float) -> Optional[float]:
    """The link efficiency that makes the model reproduce a multi-node run's measured step: the step beyond
    the predicted compute is the exposed all-reduce. None when the run was no slower than its compute (the
    network cost it nothing visible: nothing to learn about the link)."""
    exposed = measured_step_seconds - compute_seconds
    if nodes <= 1 or exposed <= 0:
        return None
    window = BACKWARD_SHARE * compute_seconds / max(1, grad_accum)
    comm = comm_from_exposed(exposed, overlappable_share(m), window)
    at_line_rate = ring_seconds(GRADIENT_BYTES_PER_PARAM * m.param_count(padded=True), gpus_per_node * nodes,
                                gbps * 1e9 / 8)
    return min(1.0, at_line_rate / comm)
