"""The relay peer (p2psync relay): stores sealed changes in Postgres for devices that never meet."""
