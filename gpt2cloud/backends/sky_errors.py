"""SkyPilot's exceptions turned into one-line UserErrors that say how to fix them.

Needs `sky` (imported inside the context manager), so only code that already talks to SkyPilot uses it.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from gpt2cloud.errors import UserError

LAMBDA_HELP = ("for Lambda: create an API key at https://cloud.lambda.ai/api-keys, put `api_key = <KEY>` in "
               "~/.lambda_cloud/lambda_keys, then `sky check lambda`")
NO_CLOUD = ("no cloud is enabled in SkyPilot: run `sky check` to see why; " + LAMBDA_HELP +
            "; or run on this machine with --infra local")
GONE = "no longer exists"  # what sky_errors says of a cluster that is gone (down tells it apart)


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
        raise UserError(f"{what}: the cluster {GONE} ({_first_line(e)}); it finished and was torn "
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
