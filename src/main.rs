//! The `rabbit-guard` binary.
fn main() {}
