"""SkyPilot's exceptions turned into one-line UserErrors that say how to fix them.

Needs `sky` (imported inside the context manager), so only code that already talks to SkyPilot uses it.
Inside `sky_errors(...)` there are only calls into SkyPilot, so every exception raised there is
SkyPilot's failure and ends as one line, never a traceback (Ctrl-C passes through untouched).
"""

from __future__ import annotations

import contextlib
import re
from typing import Optional

from gpt2cloud.backends import NothingRunning
from gpt2cloud.errors import UserError

LAMBDA_HELP = ("for Lambda: create an API key at https://cloud.lambda.ai/api-keys, put `api_key = <KEY>` in "
               "~/.lambda_cloud/lambda_keys, then `sky check lambda`")
NO_CLOUD = ("no cloud is enabled in SkyPilot: run `sky check` to see why; " + LAMBDA_HELP +
            "; or run on this machine with --infra local")
GONE = "no longer exists"  # what sky_errors says of a cluster that is gone (down tells it apart)
SERVER_HELP = "start one with `sky api start` or check SKYPILOT_API_SERVER_ENDPOINT"


class ClusterGone(NothingRunning):
    """SkyPilot has no such cluster (ClusterDoesNotExist): autostop tore it down, or it never came up."""


class ControllerNotUp(NothingRunning):
    """SkyPilot's managed-jobs controller is not up (ClusterNotUpError from a jobs call): no managed job
    of this user is in progress."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(e: BaseException) -> str:
    """The first non-empty line of the message, without the terminal colours SkyPilot puts in."""
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _is_jobs_controller(e: BaseException) -> bool:
    text = str(e).lower()
    return "managed job" in text or "controller" in text


@contextlib.contextmanager
def sky_errors(what: str, infra: Optional[str] = None, gpus: Optional[str] = None):
    """Turn SkyPilot's exceptions raised inside into one-line UserErrors that say how to fix them."""
    import requests
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
        raise UserError(f"{what}: no {gpus or 'GPUs'} available on {where} ({first_line(e)}); try another "
                        "--infra or GPU type (`sky show-gpus`), or retry later") from None
    except ex.NotSupportedError as e:
        raise UserError(f"{what}: not supported on {where}: {first_line(e)}") from None
    except ex.ClusterDoesNotExist as e:
        raise ClusterGone(f"{what}: the cluster {GONE} ({first_line(e)}); it finished and was torn "
                          "down, or was downed: `gpt2cloud fetch RUN` still works from the bucket") from None
    except ex.ClusterNotUpError as e:
        if _is_jobs_controller(e):
            raise ControllerNotUp(
                f"{what}: SkyPilot's managed-jobs controller is not up ({first_line(e)}), so no managed job is "
                "in progress; `sky jobs queue --refresh` starts it to show past jobs, and the run's files stay "
                "in its bucket (`gpt2cloud fetch RUN`)") from None
        raise UserError(f"{what}: the cluster is not up ({first_line(e)}); see `gpt2cloud status RUN`, and "
                        "`gpt2cloud down RUN` removes it") from None
    except ex.ResourcesMismatchError as e:
        raise UserError(f"{what}: the run's cluster is still up with other resources ({first_line(e)}); "
                        "`gpt2cloud down RUN` first, or launch under another --name") from None
    except ex.CloudError as e:
        if any(w in str(e) for w in ("ConnectionError", "NameResolutionError", "Max retries exceeded")):
            raise UserError(f"{what}: network error talking to the cloud or SkyPilot's catalog "
                            f"({first_line(e)[:160]}); check this machine's internet connection, then "
                            "`sky check`") from None
        raise UserError(f"{what}: the cloud refused ({first_line(e)}); check your credentials with "
                        f"`sky check`; {LAMBDA_HELP}") from None
    except (ex.InvalidCloudCredentials, ex.CloudUserIdentityError, ex.ClusterOwnerIdentityMismatchError) as e:
        raise UserError(f"{what}: cloud credentials or identity problem ({first_line(e)}); fix them and run "
                        "`sky check`") from None
    except ex.ApiServerConnectionError as e:
        raise UserError(f"{what}: cannot reach the SkyPilot API server ({first_line(e)}); {SERVER_HELP}") \
            from None
    except requests.exceptions.ConnectionError as e:  # the server went away mid-request
        raise UserError(f"{what}: lost the connection to the SkyPilot API server ({first_line(e)[:160]}); "
                        f"{SERVER_HELP}, then `gpt2cloud status RUN`") from None
    except ex.ApiServerAuthenticationError as e:
        raise UserError(f"{what}: the SkyPilot API server wants a login ({first_line(e)}); run `sky api login`") \
            from None
    except ex.APIVersionMismatchError as e:
        raise UserError(f"{what}: the SkyPilot API server runs another version ({first_line(e)}); for a local "
                        "server run `sky api stop` (the next command starts a matching one)") from None
    except (ex.ServerTemporarilyUnavailableError, ex.RequestInterruptedError, ex.ConcurrentWorkerExhaustedError) \
            as e:
        raise UserError(f"{what}: the SkyPilot API server is busy or restarting ({first_line(e)}); retry in a "
                        "minute") from None
    except ex.RequestCancelled as e:
        raise UserError(f"{what}: SkyPilot's request was cancelled ({first_line(e)}), by `gpt2cloud down`, "
                        "`sky api cancel` or another process") from None
    except ex.InvalidSkyPilotConfigError as e:
        raise UserError(f"{what}: SkyPilot rejected the task: {first_line(e)}") from None
    except (ex.ManagedJobReachedMaxRetriesError, ex.ProvisionPrechecksError) as e:
        raise UserError(f"{what}: {first_line(e)}; try another --infra or GPU type") from None
    except (ex.CommandError, ex.ClusterSetUpError) as e:
        raise UserError(f"{what}: a command on the cluster failed ({first_line(e)}); see `gpt2cloud logs`") \
            from None
    except (ex.NetworkError, ex.FetchClusterInfoError, ex.ClusterStatusFetchingError) as e:
        raise UserError(f"{what}: could not reach the cluster or its cloud ({first_line(e)}); check the "
                        "network and retry; `sky status --refresh` shows what SkyPilot sees") from None
    except (ex.StorageError, ex.StorageSpecError) as e:
        raise UserError(f"{what}: SkyPilot storage failed ({first_line(e)}); check --data / --bucket and the "
                        "credentials for them") from None
    except (ex.PermissionDeniedError, ex.UserRequestRejectedByPolicy) as e:
        raise UserError(f"{what}: SkyPilot refused ({first_line(e)}); ask whoever runs the API server") from None
    except Exception as e:  # noqa: BLE001 - whatever else SkyPilot raises (AssertionError, RuntimeError, ...)
        raise UserError(f"{what}: SkyPilot failed ({type(e).__name__}: {first_line(e)[:200]}); `sky api logs` "
                        "shows the server's side, `sky check` the clouds") from None
