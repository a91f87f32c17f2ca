"""Which clouds can run a launch and what it costs there: the one module that reads SkyPilot's catalog.

- enabled_clouds(): the clouds `sky check` enabled (SkyPilot's cached credential check);
- check_infra(): an unknown cloud, spot where the cloud has none (Lambda, Kubernetes, ...), a GPU type
  or count the cloud's catalog does not offer;
- gpu_price() and vm_price(): a launch's one Price (gpt2cloud/cost/prices.py), GPU nodes and CPU VMs alike.

Needs `sky` (imported inside the functions); the catalogs are SkyPilot's cached CSVs, downloaded by
SkyPilot when missing: if that fails (offline) the GPU check is skipped and SkyPilot decides at launch.
"""

from __future__ import annotations

import logging
from typing import Optional

from gpt2cloud.backends.sky_errors import NO_CLOUD
from gpt2cloud.cost import prices
from gpt2cloud.cost.prices import Price
from gpt2cloud.errors import UserError
from gpt2cloud.names import ANY, LOCAL


def sky_module():
    """import sky for in-process use: as a client (rich spinners, not the API server's encoded payloads)."""
    import sys

    import sky
    from sky.utils import annotations

    annotations.is_on_api_server = False
    # SkyPilot logs to stdout; keep stdout for our output (YAML, JSON).
    for handler in logging.getLogger("sky").handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)
    return sky


def _cloud_name(cloud) -> str:
    return str(cloud).lower()


def enabled_clouds() -> list[str]:
    """Lowercase names of the clouds SkyPilot may use for compute (empty when none)."""
    sky = sky_module()
    from sky import check as sky_check

    try:
        clouds = sky_check.get_cached_enabled_clouds_or_refresh(sky.clouds.CloudCapability.COMPUTE,
                                                                 raise_if_no_cloud_access=False)
    except sky.exceptions.NoCloudAccessError:
        return []
    return sorted({_cloud_name(c) for c in clouds})


def _cloud(infra: str):
    sky = sky_module()

    name = infra.split("/")[0]
    try:
        cloud = sky.CLOUD_REGISTRY.from_str(name)
    except ValueError:
        cloud = None
    if cloud is None:
        raise UserError(f"--infra {infra}: unknown cloud '{name}'; use one of {', '.join(known_infras())} "
                        "(or a region: lambda/us-east-1)")
    return cloud


def known_infras() -> list[str]:
    import sky

    return sorted({_cloud_name(c) for c in sky.CLOUD_REGISTRY.values()} | {LOCAL})


def supports_spot(infra: str) -> bool:
    import sky

    cloud = _cloud(infra)
    spot = sky.clouds.CloudImplementationFeatures.SPOT_INSTANCE
    try:
        cloud.check_features_are_supported(sky.Resources(infra=infra, use_spot=True), {spot})
    except sky.exceptions.NotSupportedError:
        return False
    except Exception:  # noqa: BLE001 - e.g. the Kubernetes client is not installed: use the static table
        return spot not in getattr(cloud, "_CLOUD_UNSUPPORTED_FEATURES", {})
    return True


def gpu_offered(infra: str, gpu: str, count: int) -> Optional[bool]:
    """True/False from the cloud's catalog; None when the catalog could not be read (offline)."""
    sky = sky_module()

    cloud = infra.split("/")[0]
    region = infra.split("/")[1] if "/" in infra else None
    try:
        offers = sky.catalog.list_accelerators(gpus_only=True, name_filter=gpu, region_filter=region,
                                               clouds=cloud, case_sensitive=False)
    except Exception:  # noqa: BLE001 - requests' ConnectionError, a missing CSV: let SkyPilot decide later
        return None
    for name, infos in offers.items():
        if name.lower() == gpu.lower() and any(int(i.accelerator_count) == count for i in infos):
            return True
    return False


def offered_counts(infra: str, gpu: str) -> list[int]:
    sky = sky_module()

    try:
        offers = sky.catalog.list_accelerators(gpus_only=True, name_filter=gpu, clouds=infra.split("/")[0],
                                               case_sensitive=False)
    except Exception:  # noqa: BLE001
        return []
    return sorted({int(i.accelerator_count) for n, infos in offers.items() if n.lower() == gpu.lower()
                   for i in infos})


def check_infra(infra: str, gpu: str, count: int, spot: bool) -> None:
    """Raise UserError for a launch this infra cannot run: an unknown cloud, spot where it has none, a GPU
    it lacks."""
    _cloud(infra)
    if spot and not supports_spot(infra):
        raise UserError(f"--spot: {infra} has no spot instances; drop --spot (on-demand with autostop) or pick "
                        "a cloud with spot, e.g. --infra aws --spot")
    offered = gpu_offered(infra, gpu, count)
    if offered is False:
        counts = offered_counts(infra, gpu)
        alt = (f"{infra} offers {gpu} in counts {', '.join(map(str, counts))}: use --gpus {gpu}:{counts[-1]}"
               if counts else f"see `sky show-gpus --infra {infra.split('/')[0]}` for what it has, or pick "
                              "another --infra")
        raise UserError(f"--gpus {gpu}:{count}: {infra} does not offer {gpu}:{count}; {alt}")


def choose_clouds(gpu: str, count: int, spot: bool) -> list[str]:
    """The enabled clouds that can run this launch (for `any_of`); UserError when none can."""
    enabled = [c for c in enabled_clouds() if c not in ("ssh",)]
    if not enabled:
        raise UserError(NO_CLOUD)
    usable = [c for c in enabled if (not spot or supports_spot(c)) and gpu_offered(c, gpu, count) is not False]
    if not usable:
        what = f"{'spot ' if spot else ''}{gpu}:{count}"
        raise UserError(f"none of the enabled clouds ({', '.join(enabled)}) offers {what}; pick another --gpus"
                        + (" or drop --spot" if spot else "") + ", or enable another cloud (`sky check`)")
    return usable


def catalog_price(infra: str, gpu: str, count: int, spot: bool = False) -> Optional[Price]:
    """The `gpu:count` offer of this cloud in SkyPilot's catalog, per GPU, on-demand or spot: of a pinned
    region (infra cloud/region), else the dearest region's, since SkyPilot may place the launch in any of
    them (the cap and the estimate take the conservative number); None when the catalog cannot be read
    or has none."""
    sky = sky_module()

    cloud, _, region = infra.partition("/")
    try:
        offers = sky.catalog.list_accelerators(gpus_only=True, name_filter=gpu, region_filter=region or None,
                                               clouds=cloud, case_sensitive=False, all_regions=True)
    except Exception:  # noqa: BLE001 - offline with no cached catalog, an unknown cloud: the table decides
        return None
    found = []
    for name, infos in offers.items():
        for i in infos:
            price = i.spot_price if spot else i.price
            if name.lower() != gpu.lower() or int(i.accelerator_count) != count or not price or price != price:
                continue  # another GPU or count, or no price (nan: no spot offer)
            found.append((float(price), i.region, i))
    if not found:
        return None
    price, _, info = sorted(found, key=lambda f: (-f[0], f[1] or ""))[0]  # the dearest; of equals, the first region
    regions = len({f[1] for f in found})
    where = (f"{info.region}, the dearest of {regions} regions (pin one: --infra CLOUD/REGION)"
             if len({f[0] for f in found}) > 1 else info.region)
    kind = "spot" if spot else "on-demand"
    return Price(price / count, f"SkyPilot catalog: {info.cloud} {info.instance_type} {kind}, {where}",
                 cloud=_cloud_name(info.cloud), region=info.region, spot=spot, instance=info.instance_type)


def candidates(infra: str, clouds: list[str]) -> list[str]:
    """Where a launch may land: its one infra, or with --infra any the enabled clouds chosen for any_of."""
    return [infra] if infra not in (ANY, LOCAL) else list(clouds)


def gpu_price(infra: str, clouds: list[str], gpu: str, count: int, spot: bool) -> Optional[Price]:
    """A training launch's catalog price: its cloud's, or with any_of over several clouds the most expensive
    (with each candidate's, for the node's own cap); None when no catalog here has one."""
    return prices.most_expensive([p for c in candidates(infra, clouds) if (p := catalog_price(c, gpu, count, spot))])


def vm_offer(infra: str, cpus: int, memory_gb: int):
    """The cheapest CPU-only instance of this size in SkyPilot's catalog of this cloud (and region): a
    Price per VM-hour; False when the catalog has only GPU instances (or none) of it; None when it cannot
    be read."""
    sky = sky_module()
    cloud, _, region = infra.partition("/")
    # SkyPilot logs a failed catalog download as an error; here it only means the fallback price is used.
    quiet = logging.getLogger("sky.catalog.common")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        itype = sky.catalog.get_default_instance_type(cpus=f"{cpus}+", memory=f"{memory_gb}+",
                                                      region=region or None, clouds=cloud)
        if not itype:
            return False
        if sky.catalog.get_accelerators_from_instance_type(itype, clouds=cloud):
            return False
        price = sky.catalog.get_hourly_cost(itype, use_spot=False, region=region or None, zone=None, clouds=cloud)
    except Exception:  # noqa: BLE001 - offline with no cached catalog, a cloud without one: no price
        return None
    finally:
        quiet.setLevel(level)
    return Price(float(price), f"SkyPilot catalog: {cloud} {itype} on-demand", per=prices.VM, cloud=cloud,
                 region=region, instance=itype)


def cpu_clouds(cpus: int, memory_gb: int) -> list[str]:
    """The enabled clouds with a CPU-only instance of this size (a GPU-only cloud would rent a GPU VM)."""
    return [c for c in enabled_clouds() if c != "ssh" and vm_offer(c, cpus, memory_gb) is not False]


def vm_price(infra: str, clouds: list[str], cpus: int, memory_gb: int) -> Price:
    """The one price of a CPU VM launch: the cheapest candidate in SkyPilot's catalogs (SkyPilot picks the
    cheapest), else the assumed per-vCPU rate."""
    found = [p for c in (candidates(infra, clouds) or ["aws", "gcp", "azure"]) if (p := vm_offer(c, cpus, memory_gb))]
    return min(found, key=lambda p: p.usd_per_hour) if found else prices.cpu_vm_fallback(cpus)
