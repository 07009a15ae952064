//! The `cloudai` program under another name, for the end-to-end tests to start.

fn main() -> std::process::ExitCode {
    cloudai::cli::main()
}
