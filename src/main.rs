//! The `rabbit-guard` binary. Everything lives in the library.

fn main() -> std::process::ExitCode {
    rabbit_guard::cli::main()
}
