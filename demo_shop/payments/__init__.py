"""The payments service: authorizes the order's total, and refunds it when the order is cancelled."""
