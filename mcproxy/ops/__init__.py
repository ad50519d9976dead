"""Operations: stats, Prometheus metrics, the status page, watch streams."""
