//! Property-based fuzzing of the two parsers that read attacker-supplied text: the canonical
//! manifest (inside a signed statement) and `SKILL.md` front matter. Neither may panic on
//! any input, and whatever the manifest parser accepts must be canonical.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use chitin_skills::{FileEntry, Manifest, skillmd};
use proptest::prelude::*;

fn path_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_.-]{1,12}", 1..4)
        .prop_map(|parts| parts.join("/"))
        .prop_filter("no dot components", |p| {
            p.split('/').all(|c| c != "." && c != "..") && p != "skill.sigstore.json"
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_manifest_parser_never_panics_and_accepts_only_canonical_text(s in "\\PC{0,300}") {
        if let Ok(m) = Manifest::parse(&s) {
            prop_assert_eq!(m.canonical(), s);
        }
    }

    #[test]
    fn mutated_manifests_never_panic_and_stay_canonical(
        entries in prop::collection::btree_map(path_strategy(), any::<[u8; 32]>(), 0..8),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let m = Manifest::from_entries(entries.into_iter().map(|(path, sha256)| FileEntry { path, sha256 })).unwrap();
        let text = m.canonical();
        prop_assert_eq!(Manifest::parse(&text).unwrap(), m);
        let mut bytes = text.into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        if let Ok(s) = String::from_utf8(bytes)
            && let Ok(m2) = Manifest::parse(&s)
        {
            prop_assert_eq!(m2.canonical(), s);
        }
    }

    #[test]
    fn the_skill_md_parser_never_panics(s in "\\PC{0,400}") {
        let _ = skillmd::parse(&s);
        let _ = skillmd::parse(&format!("---\n{s}\n---\nbody"));
    }

    #[test]
    fn yaml_like_front_matter_never_panics(
        lines in prop::collection::vec("[ a-z:\\-\\[\\]{}\"'&*!|>#,0-9]{0,30}", 0..12)
    ) {
        let fm = lines.join("\n");
        let _ = skillmd::parse(&format!("---\nname: a\ndescription: d\n{fm}\n---\n"));
    }

    #[test]
    fn valid_front_matter_round_trips_name_and_version(
        name in "[a-z][a-z0-9]{0,10}",
        major in 0u32..100, minor in 0u32..100, patch in 0u32..100,
    ) {
        let v = format!("{major}.{minor}.{patch}");
        let m = skillmd::parse(&format!("---\nname: {name}\ndescription: x\nversion: \"{v}\"\n---\n")).unwrap();
        prop_assert_eq!(m.name, name);
        prop_assert_eq!(m.version, v);
    }
}
