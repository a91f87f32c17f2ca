"""Which clouds can run a launch, checked in-process before anything is provisioned.

- enabled_clouds(): the clouds `sky check` enabled (SkyPilot's cached credential check);
- check_infra(): an unknown cloud, spot where the cloud has none (Lambda, Kubernetes, ...), a GPU type
  or count the cloud's catalog does not offer.

Needs `sky` (imported inside the functions); the catalogs are SkyPilot's cached CSVs, downloaded by
SkyPilot when missing: if that fails (offline) the GPU check is skipped and SkyPilot decides at launch.
"""

from __future__ import annotations

from typing import Optional

from gpt2cloud.backends.sky_errors import NO_CLOUD
from gpt2cloud.errors import UserError
from gpt2cloud.names import ANY, LOCAL



def sky_module():
    """import sky for in-process use: as a client (rich spinners, not the API server's encoded payloads)."""
    import logging
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


def catalog_price(infra: str, gpu: str, count: int, spot: bool = False) -> Optional[tuple[float, str]]:
    """(USD per GPU-hour, where it comes from) of the cheapest `gpu:count` offer in SkyPilot's catalog of
    this cloud (and region, if given), on-demand or spot; None when the catalog cannot be read or has none."""
    sky = sky_module()

    cloud, _, region = infra.partition("/")
    try:
        offers = sky.catalog.list_accelerators(gpus_only=True, name_filter=gpu, region_filter=region or None,
                                               clouds=cloud, case_sensitive=False, all_regions=True)
    except Exception:  # noqa: BLE001 - offline with no cached catalog, an unknown cloud: the table decides
        return None
    best = None
    for name, infos in offers.items():
        for i in infos:
            price = i.spot_price if spot else i.price
            if name.lower() != gpu.lower() or int(i.accelerator_count) != count or not price or price != price:
                continue  # another GPU or count, or no price (nan: no spot offer)
            if best is None or price < best[0]:
                best = (float(price), i)
    if best is None:
        return None
    price, info = best
    kind = "spot" if spot else "on-demand"
    return price / count, f"SkyPilot catalog: {info.cloud} {info.instance_type} {kind}, {info.region}"


def launch_price(infra: str, clouds: list[str], gpu: str, count: int,
                 spot: bool) -> Optional[tuple[float, str, dict]]:
    """(price, source, {cloud: price}) a launch is estimated and capped at: its cloud's catalog price,
    or with any_of over several clouds the most expensive of them (a failover must not let spending
    past the cap); the node then caps at its own cloud's price from the dict."""
    candidates = [infra] if infra not in (ANY, LOCAL) else list(clouds)
    found = {c.split("/")[0]: p for c in candidates if (p := catalog_price(c, gpu, count, spot))}
    if not found:
        return None
    price, source = max(found.values())
    if len(found) > 1:
        source = f"the most expensive of {len(found)} any_of candidates: {source}"
    return price, source, {c: p[0] for c, p in found.items()}
