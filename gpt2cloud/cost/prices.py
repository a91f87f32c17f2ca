"""What an hour of compute costs: one Price value, whatever it prices (a GPU of a training node, a
whole CPU VM of a prepare job) and wherever the figure comes from.

A launch resolves its price once (gpt2cloud/launch/clouds.py resolve_*_price: --price, else SkyPilot's
catalog, else the bundled table below); the estimate, the run's spec, the trainer's cap and `status`
all use that one value. Plain data: no SkyPilot here (cost/ answers instantly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gpt2cloud.cost.hardware import table

GPU, VM = "gpu", "vm"  # what one unit of a price is: one GPU of a node, or one whole VM

# When SkyPilot's catalog has no price for a CPU VM: a typical on-demand general-purpose rate (AWS m6i,
# $0.048 per vCPU-hour, us-east-1, 2025), assumed: the prepare job's estimate says so.
FALLBACK_USD_PER_CPU_HOUR = 0.048


@dataclass(frozen=True)
class Price:
    usd_per_hour: float  # per unit: one GPU (GPU) or one VM (VM)
    source: str  # printed next to every figure made from it
    per: str = GPU
    cloud: str = ""  # "" for --price and the table
    region: str = ""
    spot: bool = False
    instance: str = ""
    # an any_of launch over several clouds: each candidate's price; usd_per_hour is the most expensive
    # (a failover must not spend past the cap), and the node caps at its own cloud's (model/config.py)
    candidates: tuple = ()  # ((cloud, usd_per_hour), ...)

    def per_gpu(self, gpus: int = 1) -> float:
        """USD per GPU-hour (a VM's price split over its units: CPU cores count as ranks)."""
        return self.usd_per_hour if self.per == GPU else self.usd_per_hour / max(1, gpus)


def given(usd: float, per: str = GPU) -> Price:
    """--price: the user's own figure."""
    return Price(float(usd), "--price", per)


def table_price(gpu: str) -> Optional[Price]:
    """The bundled table's price of one GPU (tables/prices.yaml), None for a GPU it does not list."""
    row = table("prices").get(gpu)
    if not row:
        return None
    return Price(float(row["usd_per_gpu_hour"]), f"table fallback: {row['source']} ({row['as_of']})")


def cpu_vm_fallback(cpus: int) -> Price:
    return Price(FALLBACK_USD_PER_CPU_HOUR * cpus, f"no catalog price here: assumed ${FALLBACK_USD_PER_CPU_HOUR}"
                 "/vCPU-hour, a typical on-demand general-purpose rate", per=VM)


def most_expensive(found: list[Price]) -> Optional[Price]:
    """Of several clouds' prices for one launch (any_of), the one it is estimated and capped at."""
    if not found:
        return None
    top = max(found, key=lambda p: p.usd_per_hour)
    if len(found) == 1:
        return top
    return Price(top.usd_per_hour, f"the most expensive of {len(found)} any_of candidates: {top.source}", top.per,
                 top.cloud, top.region, top.spot, top.instance,
                 candidates=tuple(sorted((p.cloud, p.usd_per_hour) for p in found)))
