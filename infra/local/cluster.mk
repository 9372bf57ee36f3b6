# Local Ray head + SeaweedFS S3 endpoint on 127.0.0.1 (docs/operations.md), included by the Makefile.
#   make cluster-up        # Ray head (token auth, dashboard on 127.0.0.1) + S3 endpoint; state in .cluster/
#   make submit-demo       # tiny shards + checkpoint in the local bucket, `ray job submit --working-dir .`, waits
#   make cluster-status
#   make cluster-down      # stops both by their recorded PIDs (never `ray stop`)
# CLUSTER_DIR holds the PIDs, the Ray token (0600), S3 keys (s3/s3.env, 0600), data and logs.
CLUSTER_DIR  ?= .cluster
CLUSTER_CPUS ?= 2
CLUSTER_PY   := $(BIN)/python infra/local/cluster.py

.PHONY: cluster-up cluster-down cluster-status submit-demo

cluster-up: venv
	$(CLUSTER_PY) up --dir $(CLUSTER_DIR) --num-cpus $(CLUSTER_CPUS)

cluster-down:
	$(CLUSTER_PY) down --dir $(CLUSTER_DIR)

cluster-status:
	$(CLUSTER_PY) status --dir $(CLUSTER_DIR)

submit-demo: venv
	$(CLUSTER_PY) submit-demo --dir $(CLUSTER_DIR)
