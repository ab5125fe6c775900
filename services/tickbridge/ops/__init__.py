"""Operations: the compose health check (`tickbridge check`) and the canonical process commands."""
