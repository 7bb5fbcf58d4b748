// The word tokenizer of embkern.tokenize_file and embkern.distributed in C++:
// embkern._C.bit_cipher.WordTable (docs/ops/bit_cipher.md, "Text").
//
// Why: the Python loop (a regex per line, a dict lookup per word) ran at
// ~1.5M tokens/s, six times slower than the counting kernel it feeds; raw
// text to vectors was mostly tokenization.
//
// The contract is the Python path's output, exactly (tests/test_bit_cipher_text.py
// compares the two on CRLF, lone CR, Unicode, invalid UTF-8, blank-line
// documents): the file is decoded as UTF-8 with errors="replace", lines end at
// "\n", "\r\n" or a lone "\r" (Python's universal newlines), each line is
// lowercased when asked, and its words are the maximal runs of \w. On a line
// of ASCII bytes those are [A-Za-z0-9_] runs and ASCII lowercasing, done here.
// A line with any byte >= 0x80 goes to the Python callable `split` (its bytes
// -> (words, blank)), which applies Python's own Unicode rules; a line is
// decoded alone, which gives the same text as decoding the file (a newline
// byte never sits inside a UTF-8 sequence). Words are keyed by their UTF-8
// bytes.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common.h"

namespace embkern {
namespace {

namespace py = pybind11;

inline bool word_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

// str.strip()'s whitespace among ASCII characters: \t \n \v \f \r, \x1c-\x1f, space.
inline bool ascii_space(unsigned char c) { return (c >= 9 && c <= 13) || (c >= 28 && c <= 32); }

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(p[i])) * 0x100000001b3ull;
  return h ^ (h >> 29);
}

// Words in first-insertion order with their counts; an open-addressing index
// (power-of-two slots, at most half full) over the words' bytes in one arena.
class WordTable {
 public:
  WordTable() : mutex_(new std::shared_mutex) { slots_.assign(1024, -1); }

  size_t size() const { return start_.size(); }

  // The id of word p[0, n), added (count 0) when absent and `add`; -1 when absent otherwise.
  int64_t find(const char* p, size_t n, bool add) {
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t s = hash_bytes(p, n) & mask;; s = (s + 1) & mask) {
      const int64_t id = slots_[s];
      if (id < 0) {
        if (!add) return -1;
        const int64_t nid = static_cast<int64_t>(start_.size());
        start_.push_back(arena_.size());
        arena_.append(p, n);
        count_.push_back(0);
        slots_[s] = nid;
        if (2 * start_.size() > slots_.size()) grow();
        return nid;
      }
      if (length(id) == n && std::memcmp(arena_.data() + start_[id], p, n) == 0) return id;
    }
  }

  size_t length(int64_t id) const {
    const size_t end = static_cast<size_t>(id) + 1 < start_.size() ? start_[id + 1] : arena_.size();
    return end - start_[id];
  }
  std::string word(int64_t id) const { return arena_.substr(start_[id], length(id)); }

  std::vector<int64_t> count_;
  // count and encode run without the GIL: count (which adds words) excludes every other call, encodes share
  std::unique_ptr<std::shared_mutex> mutex_;

 private:
  void grow() {
    std::vector<int64_t> slots(slots_.size() * 2, -1);
    const uint64_t mask = slots.size() - 1;
    for (int64_t id = 0; id < static_cast<int64_t>(start_.size()); ++id) {
      uint64_t s = hash_bytes(arena_.data() + start_[id], length(id)) & mask;
      while (slots[s] >= 0) s = (s + 1) & mask;
      slots[s] = id;
    }
    slots_.swap(slots);
  }

  std::string arena_;
  std::vector<size_t> start_;
  std::vector<int64_t> slots_;
};

// One line: its words as (pointer, length) into the data or into the
// Scanner's buffers (valid until the next line), and whether it is blank.
struct Line {
  std::vector<std::pair<const char*, size_t>> words;
  bool blank = true;
};

class Scanner {
 public:
  // split: borrowed; the caller keeps it alive (the Scanner runs without the GIL, so it holds no reference)
  Scanner(const char* data, size_t n, bool lowercase, PyObject* split)
      : p_(data), end_(data + n), lowercase_(lowercase), split_(split) {}

  // The next line into `line`; false at the end of the data.
  bool next(Line& line) {
    if (p_ >= end_) return false;
    const char* b = p_;
    const char* e = b;
    bool ascii = true;
    while (e < end_ && *e != '\n' && *e != '\r') {
      ascii &= static_cast<unsigned char>(*e) < 0x80;
      ++e;
    }
    p_ = e;
    if (p_ < end_) {
      if (*p_ == '\r' && p_ + 1 < end_ && p_[1] == '\n') ++p_;
      ++p_;
    }
    line.words.clear();
    line.blank = true;
    if (ascii) {
      if (lowercase_) {
        lower_.assign(b, e);
        for (char& c : lower_)
          if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
        const char* base = lower_.data();
        words_of(base, base + lower_.size(), line);
      } else {
        words_of(b, e, line);
      }
    } else {
      fallback(b, e, line);
    }
    return true;
  }

 private:
  static void words_of(const char* b, const char* e, Line& line) {
    for (const char* q = b; q < e;) {
      const unsigned char c = static_cast<unsigned char>(*q);
      if (!ascii_space(c)) line.blank = false;
      if (!word_char(c)) {
        ++q;
        continue;
      }
      const char* s = q;
      while (q < e && word_char(static_cast<unsigned char>(*q))) ++q;
      line.words.emplace_back(s, static_cast<size_t>(q - s));
      line.blank = false;
    }
  }

  void fallback(const char* b, const char* e, Line& line) {
    py::gil_scoped_acquire gil;
    py::object got = py::handle(split_)(py::bytes(b, static_cast<size_t>(e - b)));
    auto pair = got.cast<py::tuple>();
    if (pair.size() != 2) throw std::runtime_error("split: expected (words, blank)");
    line.blank = pair[1].cast<bool>();
    held_.clear();
    for (auto w : pair[0]) {
      Py_ssize_t len = 0;
      const char* s = PyUnicode_AsUTF8AndSize(w.ptr(), &len);
      if (s == nullptr) throw py::error_already_set();
      held_.emplace_back(s, static_cast<size_t>(len));
    }
    for (const auto& w : held_) line.words.emplace_back(w.data(), w.size());
  }

  const char* p_;
  const char* end_;
  bool lowercase_;
  PyObject* split_;
  std::string lower_;
  std::vector<std::string> held_;
};

std::pair<const char*, size_t> bytes_of(const py::object& data, const char* name) {
  if (!PyBytes_Check(data.ptr()))
    type_error(std::string(name) + ": expected bytes, got " + std::string(py::str(data.get_type().attr("__name__"))));
  char* p = nullptr;
  Py_ssize_t n = 0;
  if (PyBytes_AsStringAndSize(data.ptr(), &p, &n) != 0) throw py::error_already_set();
  return {p, static_cast<size_t>(n)};
}

// Adds the counts of every word of data (new words appended in order of first occurrence).
void count_words(WordTable& t, py::object data, bool lowercase, py::object split) {
  auto [p, n] = bytes_of(data, "data");
  py::gil_scoped_release nogil;
  std::unique_lock<std::shared_mutex> lock(*t.mutex_);
  Scanner sc(p, n, lowercase, split.ptr());
  Line line;
  while (sc.next(line))
    for (const auto& w : line.words) ++t.count_[t.find(w.first, w.second, true)];
}

// (ids int32, doc_offsets int64) of the documents of data with the table's
// ids; words not in the table are dropped, and so are documents left empty
// (one document per line, or per block between blank lines).
py::tuple encode(WordTable& t, py::object data, bool lowercase, bool blank_line_docs, py::object split) {
  auto [p, n] = bytes_of(data, "data");
  std::vector<int32_t> ids;
  std::vector<int64_t> offs{0};
  {
    py::gil_scoped_release nogil;
    std::shared_lock<std::shared_mutex> lock(*t.mutex_);
    if (t.size() > (size_t(1) << 31) - 1) throw std::invalid_argument("WordTable: more than 2^31 - 1 words");
    Scanner sc(p, n, lowercase, split.ptr());
    Line line;
    while (sc.next(line)) {
      if (!blank_line_docs || !line.blank) {
        for (const auto& w : line.words) {
          const int64_t id = t.find(w.first, w.second, false);
          if (id >= 0) ids.push_back(static_cast<int32_t>(id));
        }
      }
      // a document ends at each line (line mode) or at a blank line; it is kept if it has known words
      if ((!blank_line_docs || line.blank) && static_cast<int64_t>(ids.size()) > offs.back())
        offs.push_back(static_cast<int64_t>(ids.size()));
    }
    if (static_cast<int64_t>(ids.size()) > offs.back()) offs.push_back(static_cast<int64_t>(ids.size()));
  }
  py::array_t<int32_t> a(static_cast<py::ssize_t>(ids.size()));
  if (!ids.empty()) std::memcpy(a.mutable_data(), ids.data(), ids.size() * sizeof(int32_t));
  py::array_t<int64_t> o(static_cast<py::ssize_t>(offs.size()));
  std::memcpy(o.mutable_data(), offs.data(), offs.size() * sizeof(int64_t));
  return py::make_tuple(a, o);
}

py::list words_of_table(const WordTable& t) {
  py::list out;
  for (int64_t id = 0; id < static_cast<int64_t>(t.size()); ++id) {
    const std::string w = t.word(id);
    PyObject* s = PyUnicode_DecodeUTF8(w.data(), static_cast<Py_ssize_t>(w.size()), "strict");
    if (s == nullptr) throw py::error_already_set();
    out.append(py::reinterpret_steal<py::object>(s));
  }
  return out;
}

void add_words(WordTable& t, const py::iterable& words, py::object counts) {
  std::vector<int64_t> c;
  if (!counts.is_none()) c = counts.cast<std::vector<int64_t>>();
  size_t k = 0;
  for (auto w : words) {
    if (!PyUnicode_Check(w.ptr())) type_error("words: expected str items, got " +
                                              std::string(py::str(w.get_type().attr("__name__"))));
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(w.ptr(), &len);
    if (s == nullptr) throw py::error_already_set();
    const int64_t id = t.find(s, static_cast<size_t>(len), true);
    if (!counts.is_none()) {
      if (k >= c.size()) value_error("counts: expected one count per word, got fewer");
      t.count_[id] += c[k];
    }
    ++k;
  }
  if (!counts.is_none() && k != c.size()) value_error("counts: expected one count per word, got more");
}

}  // namespace

void register_bit_cipher_text(py::module_& m) {
  using py::arg;
  py::class_<WordTable>(m, "WordTable",
                        "Words in first-insertion order with counts, keyed by UTF-8 bytes: the C++ word "
                        "tokenizer behind embkern.tokenize_file (docs/ops/bit_cipher.md, \"Text\").")
      .def(py::init<>())
      .def("__len__", &WordTable::size)
      .def("add", &add_words, arg("words"), arg("counts") = py::none(),
           "Appends words not yet in the table (in order); adds counts (one per word) when given.")
      .def("count", &count_words, arg("data"), arg("lowercase"), arg("split"),
           "Adds the counts of every \\w+ word of data (bytes of whole lines); new words get the next ids. "
           "split(line_bytes) -> (words, blank) handles the lines with non-ASCII bytes.")
      .def("encode", &encode, arg("data"), arg("lowercase"), arg("blank_line_docs"), arg("split"),
           "(ids (N,) int32, doc_offsets (n_docs + 1,) int64) of the documents of data; unknown words and "
           "documents left empty are dropped.")
      .def("words", &words_of_table, "The words, by id.")
      .def("counts", [](const WordTable& t) {
        py::array_t<int64_t> a(static_cast<py::ssize_t>(t.count_.size()));
        if (!t.count_.empty()) std::memcpy(a.mutable_data(), t.count_.data(), t.count_.size() * sizeof(int64_t));
        return a;
      }, "(len,) int64: the counts, by id.")
      .def(py::pickle(
          [](const WordTable& t) {
            py::list c;
            for (int64_t x : t.count_) c.append(x);
            return py::make_tuple(words_of_table(t), c);
          },
          [](py::tuple s) {
            if (s.size() != 2) value_error("WordTable: bad pickle state");
            WordTable t;
            add_words(t, s[0], s[1]);
            return t;
          }));
}

}  // namespace embkern
