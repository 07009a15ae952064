//! The `cloudai` binary: everything is in the library, see [`cloudai::cli`].

fn main() -> std::process::ExitCode {
    cloudai::cli::main()
}
