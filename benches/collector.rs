//! Collector benchmark (filled in below).
fn main() {}
