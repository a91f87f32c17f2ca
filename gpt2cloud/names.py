"""Names shared by the launch, the registry and the backends, defined once.

Infra (where a launch may go), kinds of run (which backend serves it) and the states gpt2cloud sets on a
run's record itself. A backend reports its own states besides these (SkyPilot's RUNNING, RECOVERING, ...;
see gpt2cloud/backends/__init__.py ACTIVE_STATES).
"""

# --infra: any_of over the enabled clouds, or this machine; anything else is a cloud[/region]
ANY = "any"
LOCAL = "local"
CPU = "CPU"  # --gpus CPU:N: the hardware table's entry for CPU ranks (local runs only)

# The kinds of run, each served by one backend (gpt2cloud/backends/); LOCAL (above) is the third:
# the node's scripts on this machine
CLUSTER = "cluster"  # an on-demand SkyPilot cluster with autostop-down
MANAGED_JOB = "managed-job"  # a SkyPilot managed job on spot, recovered after preemption

# The states gpt2cloud writes into a run's record
LAUNCHING = "LAUNCHING"  # recorded, its backend starting it
LAUNCHED = "LAUNCHED"  # the backend took it
LAUNCH_FAILED = "LAUNCH_FAILED"  # the launch failed or was interrupted; its backend removed what it started
DOWN = "DOWN"  # `gpt2cloud down` stopped it
SUCCEEDED = "SUCCEEDED"  # a prepare job that left a complete set (training runs: the backend says)
FAILED = "FAILED"
UNKNOWN = "UNKNOWN"  # a record rebuilt from what exists (its file was missing or damaged)

# The task's plain env naming the run's trackers' packages (space-separated), which the node's setup installs
# (gpt2cloud/launch/build.py, gpt2cloud/launch/scripts.py); defined here for the local backend, which keeps a
# stray one in this shell away from its nodes
NODE_EXTRAS_ENV = "GPT2CLOUD_NODE_EXTRAS"
