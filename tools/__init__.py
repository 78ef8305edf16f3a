"""Development tooling: protobuf generation, a throwaway PostgreSQL, and the `dlrhub serve` launcher."""
