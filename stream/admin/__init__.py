"""The admin API (FastAPI): memory state, versions, lag and metrics of a running job."""
