# Preprocessing of the real datasets (docs/datasets.md); include from the Makefile.
#   make data-chaos RAW=<.../CHAOS_Train_Sets/Train_Sets/MR> [OUT=<folder>] [DATA_ARGS="--parity --workers 8"]
#   make data-sabs  RAW=<.../RawData/Training>               [OUT=<folder>] [DATA_ARGS=...]
#   make data-cmr   RAW=<MS-CMRSeg download folder>          [OUT=<folder>] [DATA_ARGS=...]
#   make data-verify DATASET=<CHAOST2|SABS|CMR> [OUT=<folder>]
# OUT defaults to the dataset's data_dir (dataloaders/datasets/<NAME>.json5). Raw folders are only read.
DATA_ARGS ?=

.PHONY: data-chaos data-sabs data-cmr data-verify

data-chaos: setup
	@test -n "$(RAW)" || { echo "usage: make data-chaos RAW=<CHAOS 'MR' folder> [OUT=...] [DATA_ARGS=...]"; exit 2; }
	$(PY) -m data_preprocessing.chaos --raw "$(RAW)" --out "$(or $(OUT),data/CHAOST2/chaos_MR_T2_normalized)" $(DATA_ARGS)

data-sabs: setup
	@test -n "$(RAW)" || { echo "usage: make data-sabs RAW=<folder with img/ and label/> [OUT=...] [DATA_ARGS=...]"; exit 2; }
	$(PY) -m data_preprocessing.sabs --raw "$(RAW)" --out "$(or $(OUT),data/SABS/sabs_CT_normalized)" $(DATA_ARGS)

data-cmr: setup
	@test -n "$(RAW)" || { echo "usage: make data-cmr RAW=<MS-CMRSeg folder> [OUT=...] [DATA_ARGS=...]"; exit 2; }
	$(PY) -m data_preprocessing.cmr --raw "$(RAW)" --out "$(or $(OUT),data/CMR/cmr_MR_normalized)" $(DATA_ARGS)

data-verify: setup
	@test -n "$(DATASET)" || { echo "usage: make data-verify DATASET=<CHAOST2|SABS|CMR> [OUT=<folder>]"; exit 2; }
	$(PY) -m data_preprocessing.verify --dataset "$(DATASET)" $(if $(OUT),--data-dir "$(OUT)",)
