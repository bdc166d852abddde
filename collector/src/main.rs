fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/synspan"));
    println!("{}", bytes.len());
}
