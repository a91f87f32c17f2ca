"""Which clouds can run a launch, checked in-process before anything is provisioned, and SkyPilot's
exceptions turned into one-line errors with the fix.

- enabled_clouds(): the clouds `sky check` enabled (SkyPilot's cached credential check);
- check_infra(): an unknown cloud, spot where the cloud has none (Lambda, Kubernetes, ...), a GPU type
  or count the cloud's catalog does not offer;
- sky_errors(): a context manager mapping NoCloudAccessError, ResourcesUnavailableError, ... to UserError.

Needs `sky` (imported inside the functions); the catalogs are SkyPilot's cached CSVs, downloaded by
SkyPilot when missing: if that fails (offline) the GPU check is skipped and SkyPilot decides at launch.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from gpt2cloud.errors import UserError

LAMBDA_HELP = ("for Lambda: create an API key at https://cloud.lambda.ai/api-keys, put `api_key = <KEY>` in "
               "~/.lambda_cloud/lambda_keys, then `sky check lambda`")
NO_CLOUD = ("no cloud is enabled in SkyPilot: run `sky check` to see why; " + LAMBDA_HELP +
            "; or run on this machine with --infra local")
LOCAL = "local"


def _sky():
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
    sky = _sky()
    from sky import check as sky_check

    try:
        clouds = sky_check.get_cached_enabled_clouds_or_refresh(sky.clouds.CloudCapability.COMPUTE,
                                                                 raise_if_no_cloud_access=False)
    except sky.exceptions.NoCloudAccessError:
        return []
    return sorted({_cloud_name(c) for c in clouds})


def _cloud(infra: str):
    sky = _sky()

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
    sky = _sky()

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
    sky = _sky()

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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def sky_errors(what: str, infra: Optional[str] = None, gpus: Optional[str] = None):
    """Turn SkyPilot's exceptions raised inside into one-line UserErrors that say how to fix them."""
    import sky
    from sky import exceptions as ex

    where = infra or "any enabled cloud"
    try:
        yield
    except UserError:
        raise
    except ex.NoCloudAccessError:
        raise UserError(NO_CLOUD) from None
    except ex.ResourcesUnavailableError as e:
        msg = str(e)
        if "spot" in msg.lower() and "not supported" in msg.lower():
            raise UserError(f"{what}: {where} has no spot instances; drop --spot or use --infra aws --spot") from None
        raise UserError(f"{what}: no {gpus or 'GPUs'} available on {where} ({_first_line(e)}); try another "
                        "--infra or GPU type (`sky show-gpus`), or retry later") from None
    except ex.NotSupportedError as e:
        raise UserError(f"{what}: not supported on {where}: {_first_line(e)}") from None
    except ex.ClusterDoesNotExist as e:
        raise UserError(f"{what}: the cluster no longer exists ({_first_line(e)}); it finished and was torn "
                        "down, or was downed: `gpt2cloud fetch RUN` still works from the bucket") from None
    except ex.CloudError as e:
        if any(w in str(e) for w in ("ConnectionError", "NameResolutionError", "Max retries exceeded")):
            raise UserError(f"{what}: network error talking to the cloud or SkyPilot's catalog "
                            f"({_first_line(e)[:160]}); check this machine's internet connection, then "
                            "`sky check`") from None
        raise UserError(f"{what}: the cloud refused ({_first_line(e)}); check your credentials with "
                        f"`sky check`; {LAMBDA_HELP}") from None
    except ex.InvalidCloudCredentials as e:
        raise UserError(f"{what}: invalid cloud credentials ({_first_line(e)}); fix them and run `sky check`") \
            from None
    except ex.ApiServerConnectionError as e:
        raise UserError(f"{what}: cannot reach the SkyPilot API server ({_first_line(e)}); start one with "
                        "`sky api start` or check SKYPILOT_API_SERVER_ENDPOINT") from None
    except ex.InvalidSkyPilotConfigError as e:
        raise UserError(f"{what}: SkyPilot rejected the task: {_first_line(e)}") from None
    except (ex.ManagedJobReachedMaxRetriesError, ex.ProvisionPrechecksError) as e:
        raise UserError(f"{what}: {_first_line(e)}; try another --infra or GPU type") from None
    except sky.exceptions.CommandError as e:
        raise UserError(f"{what}: a command on the cluster failed ({_first_line(e)}); see `gpt2cloud logs`") \
            from None
