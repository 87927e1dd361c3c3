"""Scale-out: the Vertex AI submitter and the container entrypoint (CLUSTER_SPEC -> accelerate launch)."""
