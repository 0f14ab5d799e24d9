//! `TextArena`: append-only storage of every inserted character, addressed by arena offset.
//! Spans point into it, so the content tree holds no strings.
//! It stays one byte per char while every char is below U+0100 and widens once otherwise.
//! It never shrinks: deleted text stays until the document is rebuilt from a snapshot.

/// Append-only char storage; `Narrow` holds chars below U+0100 as single bytes.
#[derive(Clone, Debug)]
pub(crate) enum TextArena {
    Narrow(Vec<u8>),
    Wide(Vec<char>),
}

impl Default for TextArena {
    fn default() -> Self {
        TextArena::Narrow(Vec::new())
    }
}

impl TextArena {
    /// Number of chars stored.
    pub(crate) fn len(&self) -> usize {
        match self {
            TextArena::Narrow(v) => v.len(),
            TextArena::Wide(v) => v.len(),
        }
    }

    /// Appends `s`; returns the arena offset of its first char.
    pub(crate) fn push_str(&mut self, s: &str) -> usize {
        let start = self.len();
        if let TextArena::Narrow(v) = self {
            if s.is_ascii() {
                v.extend_from_slice(s.as_bytes());
                return start;
            }
            if s.chars().all(|c| (c as u32) < 0x100) {
                v.extend(s.chars().map(|c| c as u8));
                return start;
            }
            let wide: Vec<char> = v.iter().map(|&b| b as char).collect();
            *self = TextArena::Wide(wide);
        }
        if let TextArena::Wide(v) = self {
            v.extend(s.chars());
        }
        start
    }

    /// The char at arena offset `i`.
    pub(crate) fn get(&self, i: usize) -> char {
        match self {
            TextArena::Narrow(v) => v[i] as char,
            TextArena::Wide(v) => v[i],
        }
    }

    /// Appends chars `start .. start+len` to `out`.
    pub(crate) fn write_to(&self, out: &mut String, start: usize, len: usize) {
        match self {
            TextArena::Narrow(v) => {
                let bytes = &v[start..start + len];
                if bytes.is_ascii() {
                    // ASCII bytes are valid UTF-8 on their own.
                    out.push_str(std::str::from_utf8(bytes).unwrap_or_default());
                } else {
                    out.extend(bytes.iter().map(|&b| b as char));
                }
            }
            TextArena::Wide(v) => out.extend(&v[start..start + len]),
        }
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            TextArena::Narrow(v) => v.capacity(),
            TextArena::Wide(v) => v.capacity() * 4,
        }
    }
}
