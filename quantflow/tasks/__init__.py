"""The six stages. Each module holds the stage as a plain function (called directly by
tests) and the Prefect task that wraps it with retries and caching."""
