"""The client protocol: slots, in-order replies, backpressure."""
