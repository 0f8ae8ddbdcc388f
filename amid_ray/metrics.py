"""The names of the metrics a worker reports each evaluation round (`worker.py` produces them;
Tune, the search, early stopping, Optuna and MLflow read them). Spelled here once, in a module
that imports nothing, so every layer can use them."""

STEP = "step"
ROUGE_L = "rougeL"
BEST_ROUGE_L = "best_rougeL"
VAL_LOSS = "val_loss"
DEV_CE = "dev_ce"
TRAIN_LOSS = "train_loss"
DISTIL_LOSS = "distil_loss"
LM_LOSS = "lm_loss"
LEARNING_RATE = "lr"
TOKENS_PER_S = "tokens_per_s"
SGO_THRESHOLD = "sgo_threshold"
#: Adaptive SGO: the dev cross-entropy a round is compared with (set before the first step).
SGO_REFERENCE_CE = "sgo_reference_ce"
TAID_T = "taid_t"
#: The metrics worth a curve per trial (numeric, one value per evaluation round).
CURVE_METRICS = (ROUGE_L, VAL_LOSS, DEV_CE, TRAIN_LOSS, DISTIL_LOSS, LM_LOSS, TOKENS_PER_S,
                 LEARNING_RATE, SGO_THRESHOLD, SGO_REFERENCE_CE, TAID_T)
