//! Language labels: `ru`, `en`, or `other`, with the detector's confidence.

/// Detects the language of `text`. Short texts are hard: whatlang's reliability flag is
/// ignored on purpose and its confidence stored instead, so users can filter on it.
pub fn detect(text: &str) -> (&'static str, f32) {
    match whatlang::detect(text) {
        Some(info) => {
            let lang = match info.lang() {
                whatlang::Lang::Rus => "ru",
                whatlang::Lang::Eng => "en",
                _ => "other",
            };
            (lang, info.confidence() as f32)
        }
        None => ("other", 0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_russian_from_english() {
        assert_eq!(
            detect("Аппетит приходит во время еды, а кушать хочется всегда.").0,
            "ru"
        );
        assert_eq!(
            detect("The quick brown fox jumps over the lazy dog near the river.").0,
            "en"
        );
        assert_eq!(
            detect("Der schnelle braune Fuchs springt über den faulen Hund.").0,
            "other"
        );
    }
}
