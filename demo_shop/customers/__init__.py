"""The customers service: credit limits, and the credit each order holds."""
