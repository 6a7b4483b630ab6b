"""The orders service: places orders and follows them to APPROVED, REJECTED or CANCELLED."""
