"""The collector role: Binance WebSocket -> HOT deque + WARM Redis + the VPS stream."""
