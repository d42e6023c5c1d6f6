fn main() {
    orchestrate_codehash::emit();
}
