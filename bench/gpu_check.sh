#!/usr/bin/env bash
# The prepared GPU check, to run as ONE command on a lent GPU machine (device tool), e.g.
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# It prints the GPU figures the issues ask for: the CUDA no-host-sync test of ZSharp.first_step,
# ZSharp/SAM/SGD step times, bf16 + channels_last training throughput, Hessian work on
# ResNet-56 against PyHessian, and transformer HVPs (the paper's ViT, GPT-2 12 x 256) with peak memory. Each part has its own time limit so one slow part cannot eat the rest.
# DEVICE=cpu QUICK=1 bash bench/gpu_check.sh checks that the script itself runs (on any machine).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
status=0
part() {  # part SECONDS COMMAND...: run one part under a time limit, remember failures, go on
    local limit=$1; shift
    echo; echo "== $*"
    timeout "$limit" "$@" || { echo "!! failed or timed out (rc=$?): $*"; status=1; }
}
python -c "import torch; print('torch', torch.__version__, '| device:',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
if [ "$QUICK" = 1 ]; then
    part 120 python bench/optim_step.py --device "$DEVICE" --quick
    part 120 python bench/train_throughput.py --device "$DEVICE" --amp bf16 --optimizers sgd,sam,zsharp \
        --steps 2 --warmup 1 --batch-size 32
    part 300 python bench/hessian_vs_pyhessian.py --device "$DEVICE" --quick
    part 300 python bench/gpu_transformer.py --device "$DEVICE" --quick
else
    part 60 python -m pytest -q tests/test_optim_protocol.py -k no_cuda_sync
    part 120 python bench/optim_step.py --device "$DEVICE"
    part 150 python bench/train_throughput.py --device "$DEVICE" --amp bf16 --channels-last \
        --optimizers sgd,sam,asam,fsam,zsharp --steps 50
    part 240 python bench/hessian_vs_pyhessian.py --device "$DEVICE" --depth 56 --images 10000 --batch 1000 \
        --trace-seeds 3
    part 180 python bench/gpu_transformer.py --device "$DEVICE"
fi
exit $status
