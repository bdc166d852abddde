fn main() -> std::process::ExitCode {
    synspan::main()
}
