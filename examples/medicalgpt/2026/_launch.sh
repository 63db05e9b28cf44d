# Shared by the run_*.sh scripts here: the environment overrides every script takes, and how tunestack is started.
#   MODEL       model to train            (default: smollm2-135m-instruct, the embedded SmolLM2)
#   NPROC       processes; above 1 through torchrun, one per GPU (default: the script's own)
#   OUTPUT_DIR  where the run is written  (default: the script's own)
#   EXTRA_ARGS  more flags, appended last so they win, e.g. "--max_steps 4 --model_max_length 256"
# shellcheck shell=bash
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_ROOT="${HERE}/../../data"
MODEL="${MODEL:-smollm2-135m-instruct}"
launch() {  # launch NPROC STAGE FLAGS...: `python -m tunestack` for one process, torchrun for more
    local nproc="$1"
    shift
    if [ "${nproc}" -gt 1 ]; then
        torchrun --nproc_per_node "${nproc}" -m tunestack "$@"
    else
        python -m tunestack "$@"
    fi
}
