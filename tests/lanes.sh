#!/usr/bin/env bash
# The whole suite as two lanes side by side (make test-lanes): most of a SLURM test's time is
# waiting on the scheduler, so the CPU tests and the fault campaign run while the SLURM
# tests wait.
#   lane A: the SLURM and fault tests (BUDGETLAB_TEST_LANE=cluster) on the cluster of
#           `slurm/cluster.sh up` (its environment must be exported: SLURM_CONF ...);
#   lane B: the fault campaign (campaign) on a second 2-node cluster of its own, started
#           here (it kills nodes and restarts its slurmctld, which lane A must not see),
#           then the CPU tests (cpu).
# Each lane writes its log; both are printed at the end; the exit code is non-zero if a lane
# failed. Usage: tests/lanes.sh PYTHON [PYTEST_ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: tests/lanes.sh PYTHON [PYTEST_ARGS...]}; shift
LOGS=${BUDGETLAB_LANE_LOGS:-/tmp/budgetlab-lanes}
rm -rf "$LOGS"; mkdir -p "$LOGS"
# The campaign's cluster: its own directory, ports, cluster name and node names.
B_ENV=(BUDGETLAB_SLURM_NODES=2 BUDGETLAB_SLURM_DIR=/var/lib/budgetlab-slurm-campaign
       BUDGETLAB_SLURM_PORT_BASE=17910 BUDGETLAB_SLURM_CLUSTER=blcampaign
       BUDGETLAB_SLURM_NODE_PREFIX=m)
start=$(date +%s)

lane() {  # lane NAME BASETEMP [env...] -- pytest over the tests of lane NAME
    local name=$1 tmp=$2; shift 2
    env "$@" BUDGETLAB_TEST_LANE="$name" DS_ACCELERATOR=cpu \
        "$PY" -m pytest -q -rs --basetemp="$tmp" -o cache_dir=".pytest_cache/$name" "${PYTEST_ARGS[@]}"
    local rc=$?
    ((rc == 5)) && rc=0   # PYTEST_ARGS left no test in this lane
    return $rc
}
PYTEST_ARGS=("$@")

( lane cluster /tmp/budgetlab-lane-cluster > "$LOGS/cluster.log" 2>&1
  echo $? > "$LOGS/cluster.rc" ) &
a=$!
(
  rc=0
  if env "${B_ENV[@]}" bash slurm/cluster.sh up > "$LOGS/campaign.log" 2>&1; then
      eval "$(env "${B_ENV[@]}" bash slurm/cluster.sh env | sed 's/^/export /')"
      lane campaign /tmp/budgetlab-lane-campaign >> "$LOGS/campaign.log" 2>&1 || rc=1
  else
      echo "tests/lanes.sh: the campaign's cluster did not start" >> "$LOGS/campaign.log"; rc=1
  fi
  env "${B_ENV[@]}" bash slurm/cluster.sh down >> "$LOGS/campaign.log" 2>&1
  echo $rc > "$LOGS/campaign.rc"
  # The CPU tests see no cluster at all.
  ( unset SLURM_CONF BUDGETLAB_SLURM_DIR BUDGETLAB_SLURM_NODES BUDGETLAB_SLURM_PORT_BASE \
          BUDGETLAB_SLURM_CLUSTER BUDGETLAB_SLURM_NODE_PREFIX
    lane cpu /tmp/budgetlab-lane-cpu > "$LOGS/cpu.log" 2>&1; echo $? > "$LOGS/cpu.rc" )
) &
b=$!
wait $a $b

status=0
for name in cluster campaign cpu; do
    echo "=================== lane $name (exit $(cat "$LOGS/$name.rc" 2>/dev/null || echo '?')) ==================="
    cat "$LOGS/$name.log" 2>/dev/null
    [[ "$(cat "$LOGS/$name.rc" 2>/dev/null)" == 0 ]] || status=1
done
echo "tests/lanes.sh: all lanes in $(( $(date +%s) - start )) s wall; exit $status"
exit $status
