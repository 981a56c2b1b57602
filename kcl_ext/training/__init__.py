"""The training harness of kcl_ext: two-stage KCL (or FCL, MoCo, CE) training and evaluation.

| module | what it holds |
|---|---|
| `config` | the schema of every config key, YAML loading with `base:`, `--set`, checks |
| `data` | data sets (split lists, Fashion-MNIST-LT, synthetic), seeded uint8 augmentations, batch orders, loaders |
| `datacheck` | split lists against their published figures and the images on disk |
| `models` | backbones, split-BN, the MoCo query/key pair with shuffle-BN |
| `trainer` | the two-stage `Trainer` (stage 1, orchestration, checkpoints of a run) |
| `probe` | stage 2: the linear classifier, features, predictions, evaluation |
| `checkpoint` | atomic writes, RNG state, the output folder, torchvision export |
| `logs` | metrics.jsonl, timing.jsonl, TensorBoard, progress |
| `metrics`, `compare` | long-tailed metrics and beta, the report, tables of several runs |
| `throughput` | the stage-1 throughput measurement |
| `cli` | `kcl-train` |

The memory bank (`kcl_ext.MemoryBank`) lives beside the loss. Importing this package needs only
torch; the commands need the `train` extra (pyyaml, torchvision, tqdm, matplotlib).
"""
