# Writes build_info.h (git commit, build type, compiler, flags). Run at every build by the
# specache_build_info target; configure_file rewrites the header only when its content changes,
# so an unchanged commit rebuilds nothing.
# Inputs: -DSRC_DIR= -DIN= -DOUT= -DSPECACHE_BUILD_TYPE= -DSPECACHE_COMPILER= -DSPECACHE_CXX_FLAGS=
find_package(Git QUIET)
set(SPECACHE_GIT_COMMIT "unknown")
if(GIT_FOUND)
  execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --short=12 HEAD WORKING_DIRECTORY ${SRC_DIR}
                  OUTPUT_VARIABLE _commit OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
  if(_rc EQUAL 0 AND _commit)
    set(SPECACHE_GIT_COMMIT "${_commit}")
    execute_process(COMMAND ${GIT_EXECUTABLE} status --porcelain --untracked-files=no WORKING_DIRECTORY ${SRC_DIR}
                    OUTPUT_VARIABLE _dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_dirty)
      string(APPEND SPECACHE_GIT_COMMIT "+dirty")
    endif()
  endif()
endif()
configure_file(${IN} ${OUT} @ONLY)
