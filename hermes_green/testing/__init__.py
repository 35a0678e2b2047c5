"""What the demo, the tests and adapter authors share: strict fake platform servers that speak
each real protocol on loopback, a scripted fake LLM, the fleet the demo runs on, and the adapter
contract kit. Shipped in the package so `hermes-green demo` runs without the repository's tests/.
Product code never imports this package (only the demo and the CLI do)."""
